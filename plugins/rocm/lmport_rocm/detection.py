"""Find ROCm GPUs without creating a device context: the kfd topology, else amd-smi/rocm-smi."""

from __future__ import annotations

import json

from lmport.detection import DetectionEnv

KFD_NODES = "/sys/class/kfd/kfd/topology/nodes/*/properties"
# gfx target versions (major*10000 + minor*100 + stepping) -> marketing family
GFX_NAMES = {90008: "MI100 (gfx908)", 90010: "MI210/MI250 (gfx90a)", 90402: "MI300 (gfx942)", 90500: "MI350 (gfx950)"}


def kfd_gfx_versions(env: DetectionEnv) -> list[int]:
    """One gfx target version per GPU node (CPU nodes report 0)."""
    versions = []
    for path in env.glob(KFD_NODES):
        for line in (env.read_text(path) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "gfx_target_version" and value.strip().isdigit() and int(value) > 0:
                versions.append(int(value))
    return versions


def smi_product_names(env: DetectionEnv) -> list[str]:
    """Product names from ``rocm-smi --showproductname --json`` (empty if it is absent)."""
    output = env.run(["rocm-smi", "--showproductname", "--json"])
    if not output:
        return []
    try:
        cards = json.loads(output)
    except ValueError:
        return []
    names = []
    for card in cards.values() if isinstance(cards, dict) else []:
        if isinstance(card, dict):
            names.append(str(card.get("Card Series") or card.get("Card series") or card.get("Card SKU") or "AMD GPU"))
    return names


def gfx_name(version: int) -> str:
    return GFX_NAMES.get(version, f"gfx{version // 10000}{(version // 100) % 100:x}{version % 100:x}")
