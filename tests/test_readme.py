"""The README's Python blocks run as they stand (on the CPU backend here; the same blocks pick CUDA on a GPU), in
order, in one namespace -- with a tiny model standing in for ``model`` and ``input_ids`` where a block uses them."""

from __future__ import annotations

import os
import re

import pytest
import torch

import kvtier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_a_readme_block_runs(index, monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("KVTIER_NVME_DIR", str(tmp_path))  # the default temp dir would do; this one is cleaned up
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, vocab_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    namespace = {"torch": torch, "kvtier": kvtier,  # the Quick start's import, which later blocks build on
                 "model": transformers.LlamaForCausalLM(config).eval(), "input_ids": torch.randint(0, 128, (1, 16))}
    block = _blocks()[index]
    if "max_new_tokens=256" in block:  # the integration block: a tiny model, fewer tokens, same calls
        block = block.replace("max_new_tokens=256", "max_new_tokens=8")
    exec(compile(block, f"README.md block {index}", "exec"), namespace)  # noqa: S102 - our own README
