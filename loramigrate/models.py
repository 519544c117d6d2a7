"""Load base models and tokenizers: a local HF directory, a GGUF file, or a hub id when online."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loramigrate.adapters import check_adapter_dir
from loramigrate.config import Device, DeviceMap, Dtype, ModelLoadConfig
from loramigrate.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: ``source`` is what from_pretrained gets, with ``gguf_file`` if any, and for a
    hub id the commit ``revision`` it was resolved to."""

    source: str
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def local(self) -> bool:
        return Path(self.source).exists()

    @property
    def path(self) -> str:
        """What identifies the model's content: the directory, the GGUF file itself, or ``<hub id>@<commit>``."""
        if self.revision:
            return f"{self.source}@{self.revision}"
        return str(Path(self.source) / self.gguf_file) if self.gguf_file else self.source

    @property
    def load_kwargs(self) -> dict[str, str]:
        """What from_pretrained needs besides ``source``."""
        return {k: v for k, v in (("gguf_file", self.gguf_file), ("revision", self.revision)) if v}


def resolve_model(ref: str | Path) -> ModelRef:
    """Check a model reference before any heavy work.

    Raises:
        ArtifactError: a local path that does not exist or is not a model directory / GGUF file.
    """
    ref = str(ref)
    p = Path(ref)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ArtifactError(f"{ref} is a file but not a .gguf model; pass a model directory or GGUF file")
        return ModelRef(str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ArtifactError(f"{ref} is not a model directory (no config.json)")
        return ModelRef(str(p))
    hub = _HUB_ID.match(ref)
    if hub and not ref.startswith((".", "/")):
        return ModelRef(hub["repo"], revision=hub_commit(hub["repo"], hub["revision"]))
    raise ArtifactError(f"model {ref} not found: no such directory or file")


@functools.cache  # one commit per run, and one hub request per model
def hub_commit(repo: str, revision: str | None = None) -> str:
    """The commit a hub id (at a branch, tag or commit; default main) stands for now, from the hub or, offline,
    from the local cache: manifests record it and every load of the run reads it, even if the hub moves on.

    Raises:
        ArtifactError: neither the hub nor the local cache knows the model.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        config = hf_hub_download(repo, "config.json", revision=revision)
    except (OSError, ValueError, HfHubHTTPError, EntryNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"model {repo} not found: no such directory, and the hub and its local cache do not "
                            f"resolve it ({first})") from None
    return Path(config).parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: every CPU build does (slowly), CUDA from Ampere on (as
    torchtune's ``verify_bf16_support`` asks torch)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


@functools.cache  # one line per process, however many models load
def _warn_no_bf16(name: str) -> None:
    log.warning("%s does not support bfloat16; dtype auto uses float32 (twice the memory)", name)


def cuda_determinism() -> None:
    """What a CUDA run needs to repeat itself: TF32 off (float32 matmuls keep their 24-bit mantissa; LORAMIGRATE_TF32=1
    turns it on for speed), no cuDNN autotuning, deterministic algorithms where PyTorch has them (warn_only: a kernel
    without one warns once instead of failing), and the cuBLAS workspace they need (set before cuBLAS starts)."""
    tf32 = os.environ.get("LORAMIGRATE_TF32") == "1"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (half precision matmuls are slow there), bfloat16 on a CUDA device that supports it,
    else float32 with one line saying so.

    Raises:
        ConfigError: bfloat16 asked for on a CUDA device without it.
    """
    if dtype == "auto" and device.type == "cuda":
        if bf16_supported(device):
            return torch.bfloat16
        _warn_no_bf16(torch.cuda.get_device_name(device))
        return torch.float32
    if dtype == "bfloat16" and not bf16_supported(device):
        raise ConfigError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; "
                          "use float32 (or auto)")
    return torch.float32 if dtype == "auto" else getattr(torch, dtype)


def resolved_load(dtype: Dtype = "auto", device: Device = "auto") -> dict[str, str]:
    """The dtype and device a model loads with on this machine, ``auto`` resolved, for manifests."""
    dev = resolve_device(device)
    return {"dtype": str(resolve_dtype(dtype, dev)).removeprefix("torch."), "device": dev.type}


def _is_causal_lm(ref: ModelRef) -> bool:
    if ref.gguf_file:
        return True  # GGUF checkpoints that transformers reads are all decoder LMs
    cfg_path = Path(ref.source) / "config.json"
    if not cfg_path.is_file():
        return True
    archs = json.loads(cfg_path.read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in archs)


def load_model(ref: ModelRef, dtype: Dtype = "auto", device: Device = "cpu", num_labels: int | None = None,
               device_map: DeviceMap | None = None, max_memory: dict[int | str, str] | None = None) -> nn.Module:
    """Load a model in eval mode: causal LMs with their LM head, encoders as the bare model, or with
    a sequence-classification head of ``num_labels`` classes when given.

    Raises:
        ArtifactError: the files cannot be read (corrupt weights, missing shards, offline hub id).
    """
    return load_with_new_modules(ref, dtype, device, num_labels, device_map, max_memory)[0]


def load_frozen(ref: ModelRef, load: ModelLoadConfig, num_labels: int | None = None) -> nn.Module:
    """A model the stage only reads (forward passes, weights): placed by ``load.device_map`` when given, so that it
    may span GPUs, CPU memory and disk.

    Raises:
        ArtifactError: the files cannot be read.
    """
    return load_model(ref, load.dtype, load.device, num_labels, load.device_map, load.max_memory_map())


def _placement(device: torch.device, device_map: DeviceMap, max_memory: dict[int | str, str] | None) -> dict:
    """from_pretrained's arguments for a device map: on the CPU only CPU memory and disk (accelerate would
    otherwise reach for any GPU)."""
    if device.type == "cpu":
        from accelerate.utils import get_max_memory

        max_memory = {"cpu": (max_memory or {}).get("cpu") or get_max_memory()["cpu"]}
    return {"device_map": device_map, "max_memory": max_memory}


def load_with_new_modules(ref: ModelRef, dtype: Dtype = "auto", device: Device = "cpu", num_labels: int | None = None,
                          device_map: DeviceMap | None = None, max_memory: dict[int | str, str] | None = None
                          ) -> tuple[nn.Module, list[str]]:
    """``load_model``, and the modules it initialised at random (no weights in the checkpoint: a new
    classification head, a pooler a distilled checkpoint dropped), which an adapter must save to be reproducible.
    With ``device_map``, accelerate places the model (see ``ModelLoadConfig.device_map``); else it sits on ``device``.

    Raises:
        ArtifactError: the files cannot be read (corrupt weights, missing shards, offline hub id).
    """
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress is ours to draw
    if not log.isEnabledFor(logging.DEBUG):
        hf_logging.set_verbosity_error()  # e.g. load reports about an unused pooler
        logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)  # "offloaded": ours to say (placed by)
    dev = resolve_device(device)
    if dev.type == "cuda":
        cuda_determinism()
    cls = AutoModelForCausalLM if _is_causal_lm(ref) else AutoModel
    kwargs: dict = ref.load_kwargs
    if num_labels is not None:
        cls, kwargs["num_labels"] = AutoModelForSequenceClassification, num_labels
    offload = tempfile.TemporaryDirectory(prefix="loramigrate-offload-") if device_map else None
    placed = {**_placement(dev, device_map, max_memory), "offload_folder": offload.name} if offload else {}
    started = time.perf_counter()
    try:
        model, info = cls.from_pretrained(ref.source, dtype=resolve_dtype(dtype, dev), output_loading_info=True,
                                          **kwargs, **placed)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"cannot load model {ref.path}: {first}") from e
    new = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", ())})
    # transformers' load report (shown with -v) lists these as MISSING: expected for a task head the checkpoint
    # never had; an adapter that saved one brings its own
    fresh = f"; new, initialised at random: {', '.join(new)}" if new else ""
    log.info("loaded %s (%s, %.1fM params%s)", ref.path, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, fresh)
    log.debug("%s: %s on %s in %.1f s", ref.path, resolve_dtype(dtype, dev), dev, time.perf_counter() - started)
    if num_labels is not None and model.config.pad_token_id is None:
        # causal-LM classifiers pool the last non-pad token, so they need the pad id the tokenizer pads with
        model.config.pad_token_id = load_tokenizer(ref).pad_token_id
    if offload is None:
        return model.to(dev).eval(), new
    model.loramigrate_offload = offload  # the folder goes when the model does
    # PEFT re-dispatches an offloaded model when it attaches an adapter, and needs the same placement to do so
    model.loramigrate_placement = placed
    log.info("%s placed by device map: %s", ref.path, _placement_summary(model))
    return model.eval(), new


def _placement_summary(model: nn.Module) -> str:
    """How many top-level parts of a dispatched model went to each device (``hf_device_map``)."""
    counts = Counter(str(where) for where in getattr(model, "hf_device_map", {}).values())
    return ", ".join(f"{n} on {where}" for where, n in counts.items())


@contextmanager
def _working_dir(path: str | None) -> Iterator[None]:
    """Run in ``path`` (when given). PEFT re-dispatches a disk-offloaded model with copies of the checkpoint files
    it reads, written at the checkpoint's absolute path made relative to the working directory
    (``PeftModel._update_offload``); run there, the copies land in the model's own offload folder and go with it."""
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _anchor_offload_copies(model: nn.Module, folder: str) -> None:
    """Make the offload index's relative paths (PEFT's copies, see ``_working_dir``) absolute, so that forward passes
    read them whatever the working directory is then."""
    for module in model.modules():
        loader = getattr(getattr(getattr(module, "_hf_hook", None), "weights_map", None), "dataset", None)
        for entry in (getattr(loader, "index", None) or {}).values():
            if "safetensors_file" in entry and not os.path.isabs(entry["safetensors_file"]):
                entry["safetensors_file"] = os.path.join(folder, entry["safetensors_file"])


def offloaded(model: nn.Module) -> bool:
    """Whether a device map put part of ``model`` in CPU memory or on disk (PEFT then re-dispatches it)."""
    return bool({"cpu", "disk"} & set(getattr(model, "hf_device_map", {}).values()))


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings' device; for a model a device map offloaded, the device they
    compute on (offloaded weights sit on the meta device between forward passes)."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embeddings.weight.device


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its own weights in memory: those a device map offloaded are brought to its execution device
    for the block (accelerate's ``align_module_device``); others are left as they are."""
    if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            yield module
    else:
        yield module


def load_tokenizer(ref: ModelRef):  # -> transformers.PreTrainedTokenizerBase
    """Load the tokenizer that ships with the model.

    Raises:
        ArtifactError: the model has no tokenizer files.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kwargs = ref.load_kwargs
    # A tokenizer.json describes the whole pipeline; model-specific classes may rebuild it from
    # vocab/merges files instead, so prefer it when present.
    has_json = ref.local and not ref.gguf_file and (Path(ref.source) / "tokenizer.json").is_file()
    cls = PreTrainedTokenizerFast if has_json else AutoTokenizer
    try:
        tok = cls.from_pretrained(ref.source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"cannot load a tokenizer for {ref.path}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def shared_vocabulary(a: ModelRef, b: ModelRef) -> bool:
    """Whether both tokenizers map every token to the same id: then token positions and logits of the two
    models line up one to one (distillation on completion tokens, the proxy ensemble)."""
    return load_tokenizer(a).get_vocab() == load_tokenizer(b).get_vocab()


def require_shared_vocabulary(a: ModelRef, b: ModelRef, purpose: str) -> None:
    """Refuse a pair whose token ids differ, for ``purpose`` (named in the message).

    Raises:
        ConfigError: the tokenizers differ.
    """
    if not shared_vocabulary(a, b):
        raise ConfigError(f"the tokenizers of {a.path} and {b.path} differ; {purpose} needs identical vocabularies")


def load_pair(base: str, adapter: str, load: ModelLoadConfig, num_labels: int | None = None) -> nn.Module:
    """A base with its adapter, frozen and in eval mode: the old pair that teachers and the proxy ensemble read
    (a classifier head comes from the adapter's modules_to_save).

    Raises:
        ArtifactError: the base or the adapter cannot be loaded, or the adapter does not fit the base.
    """
    ref = resolve_model(base)
    check_adapter_dir(adapter)
    model = load_frozen(ref, load, num_labels=num_labels)
    try:
        pair = attach_adapter(model, adapter)
    except (RuntimeError, ValueError, KeyError) as e:
        problem = " ".join(str(e).split())[:240]  # PyTorch names the mismatched tensors after a header line
        raise ArtifactError(f"{adapter} does not load on {base}: {problem}") from None
    return pair.requires_grad_(False).eval()


def attach_adapter(model: nn.Module, adapter: str | Path, **kwargs):  # -> peft.PeftModel
    """``PeftModel.from_pretrained``, with PEFT's warning about adapter keys missing from the file (kilobytes on
    one line: every LoRA tensor of a new base's layers the adapter never had, as when an old adapter is
    evaluated as is on a deeper base) turned into one line; -v logs PEFT's text in full."""
    from peft import PeftModel

    placement = getattr(model, "loramigrate_placement", {})
    with warnings.catch_warnings(record=True) as caught, _working_dir(placement.get("offload_folder")):
        pair = PeftModel.from_pretrained(model, str(adapter), **placement, **kwargs)
    if placement:
        _anchor_offload_copies(pair, placement["offload_folder"])
    for w in caught:
        text = str(w.message)
        if placement and "to a meta parameter in the current model" in text:
            continue  # offloaded LoRA weights: PEFT writes them to the offload map after this (no-op) copy
        if not text.startswith("Found missing adapter keys"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in re.findall(r"'([^']+)'", text)})
        log.info("%s has no weights for %d LoRA modules of %s (e.g. %s), which keep PEFT's initialisation "
                 "(expected when the adapter comes from a shallower base)", adapter, len(modules),
                 getattr(model, "name_or_path", "this base"), modules[0])
        log.debug("%s", text)
    return pair
