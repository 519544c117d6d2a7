"""Transfer stage: an old LoRA adapter → a PEFT adapter for the new base, training-free."""

from loramigrate.transfer.core import TransferOptions, transfer_adapter
from loramigrate.transfer.runner import run_transfer

__all__ = ["TransferOptions", "run_transfer", "transfer_adapter"]
