"""Transfer stage: an old LoRA adapter → a PEFT adapter for the new base, training-free."""

from loramigrate.transfer.core import TransferOptions, refactor, transfer_adapter
from loramigrate.transfer.runner import run_transfer

__all__ = ["TransferOptions", "refactor", "run_transfer", "transfer_adapter"]
