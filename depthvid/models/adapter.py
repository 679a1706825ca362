"""Save and load the tuned weights of a VideoUNet (the trainable set only) next to a base model id.

A directory holds ``adapter.safetensors`` (the tensors) and ``adapter.json`` (what they fit:
base model, a hash of its UNet config, the inflation flags). Both are written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import depthvid
from depthvid.errors import UserError
from depthvid.fileutil import atomic_path, write_json
from depthvid.models.video_unet import VideoUNet, trainable_parameters

WEIGHTS_NAME = "adapter.safetensors"
META_NAME = "adapter.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def config_hash(config) -> str:
    """sha256 (hex) of the UNet config as sorted JSON, without private ``_`` keys (``_name_or_path``...)."""
    public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    text = json.dumps(public, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_adapter(video_unet: VideoUNet, directory, base_model: str, dtype: torch.dtype = torch.float16) -> Path:
    """Write the trainable weights of ``video_unet`` and their metadata to ``directory``.

    Args:
        video_unet: an inflated UNet (its trainable set: attn1.to_q, attn2.to_q, attn_temp, norm_temp).
        directory: created if missing; ``adapter.safetensors`` and ``adapter.json`` are replaced.
        base_model: the hub id or local path the UNet was loaded from (recorded, not checked).
        dtype: storage dtype. float16 (default) halves the file; weights round to fp16, so a
            reloaded model matches to fp16 precision. Pass torch.float32 for a bit-exact copy.

    Returns:
        the directory, as a Path.
    """
    dtype_name = next((name for name, d in _DTYPES.items() if d == dtype), None)
    if dtype_name is None:
        raise UserError(f"dtype: expected one of torch.{', torch.'.join(_DTYPES)}, got {dtype}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in trainable_parameters(video_unet).items()}
    meta = {
        "base_model": base_model,
        "config_hash": config_hash(video_unet.config),
        "inflation": video_unet.inflation,
        "depthvid_version": depthvid.__version__,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "dtype": dtype_name,
    }
    with atomic_path(directory / WEIGHTS_NAME) as temp:
        save_file(tensors, str(temp))
    write_json(directory / META_NAME, meta)
    return directory


def load_adapter(video_unet: VideoUNet, directory) -> dict[str, Any]:
    """Load an adapter written by :func:`save_adapter` into ``video_unet``'s trainable set, in place.

    Tensors are cast to each parameter's dtype and device. Raises ``UserError`` when the files
    are missing, when the adapter was made for a UNet with another config or other inflation
    flags, or when its tensor names or shapes differ from this UNet's trainable set.

    Returns:
        the adapter's metadata (the contents of adapter.json).
    """
    directory = Path(directory)
    meta_path, weights_path = directory / META_NAME, directory / WEIGHTS_NAME
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise UserError(f"directory: {str(path)!r} not found; pass a folder written by save_adapter (a tune run)")
    meta = json.loads(meta_path.read_text())
    where = f"directory {str(directory)!r}"

    this_base = video_unet.config.get("_name_or_path") or "this UNet"
    this_hash = config_hash(video_unet.config)
    if meta["config_hash"] != this_hash:
        raise UserError(
            f"{where}: adapter was tuned on base {meta['base_model']!r} (UNet config sha256 "
            f"{meta['config_hash'][:12]}) but the model given is {this_base!r} (sha256 {this_hash[:12]}); "
            f"load {meta['base_model']!r} instead"
        )
    if meta["inflation"] != video_unet.inflation:
        raise UserError(
            f"{where}: adapter of base {meta['base_model']!r} was tuned with inflation {meta['inflation']} "
            f"but {this_base!r} was inflated with {video_unet.inflation}; inflate_unet with the adapter's flags"
        )

    tensors = load_file(weights_path)
    params = trainable_parameters(video_unet)
    missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or extra:
        raise UserError(
            f"{where}: {weights_path.name} does not match this model's trainable set "
            f"(missing {len(missing)}: {missing[:3]}, unexpected {len(extra)}: {extra[:3]}); re-save the adapter"
        )
    wrong_shape = [name for name, p in params.items() if tensors[name].shape != p.shape]
    if wrong_shape:
        raise UserError(f"{where}: {weights_path.name} has tensors of the wrong shape: {wrong_shape[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return meta
