"""The reference loader: unquantized safetensors checkpoints, single or sharded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from lmport.weights.quantization import WeightsLoader


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order when sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


class SafetensorsLoader(WeightsLoader):
    """``convert_floats``: cast floating tensors to the model dtype (unquantized checkpoints); off for
    quantized ones, whose layers cast what they keep themselves (fp8 weights, float32 scales)."""

    def __init__(self, progress: bool = True, convert_floats: bool = True):
        self.progress = progress
        self.convert_floats = convert_floats

    def iter_weights(self, path: Path, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        files = checkpoint_files(Path(path))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(files), desc="Loading safetensors shards", unit="shard", disable=len(files) < 2)
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if self.convert_floats and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    yield name, tensor.to(device)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
