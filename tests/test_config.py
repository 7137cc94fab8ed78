"""Config files: every example passes, every error names the file, the key and what to write instead."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

import kvtier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))))
def test_every_example_config_is_valid(path):
    config = kvtier.Config.from_file(path)
    assert config.policy in ("lru", "lfu", "priority")


def test_sizes_sections_spaces_and_policy_parameters_load(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[gpu]\npool_budget = "6GiB"\n[host]\nsize = "2GiB"\n[nvme]\nmin_uses = 2\n'
                    '[policy]\nname = "priority"\naging_seconds = 5.0\n[spaces.chat]\nquota = "1GiB"\npriority = 4\n')
    config = kvtier.Config.from_file(str(path))
    assert config.pool_budget == 6 << 30 and config.host_size == 2 << 30 and config.nvme_min_uses == 2
    assert config.policy_params == {"aging_seconds": 5.0}
    assert config.spaces == {"chat": {"quota_bytes": 1 << 30, "priority": 4}}
    # an immutable object; overrides win over the file
    with pytest.raises(Exception):
        config.host_size = 1  # type: ignore[misc]
    assert kvtier.Config.from_file(str(path), host_size=1 << 20).host_size == 1 << 20


@pytest.mark.parametrize("text, message", [
    ('[host]\nsize = "12 gigs"\n', '[host] size: "12 gigs" is not a size (use e.g. "12GiB"'),
    ('[host]\nsise = 3\n', "[host] sise: unknown key (known: size, pin_chunk"),
    ('[tiers]\nx = 1\n', "[tiers]: unknown key (known: gpu, host, nvme, policy, spaces)"),
    ('[gpu]\npool_budget = 1.5\n', "[gpu] pool_budget: 1.5: a fraction must lie in (0, 1]"),
    ('[gpu]\nlow_watermark = 0.5\nhigh_watermark = 0.2\n', "[gpu]: low_watermark 0.5 is above high_watermark"),
    ('[nvme]\nthreads = 0\n', "[nvme] threads: 0: Input should be greater than or equal to 1"),
    ('[spaces.chat]\nquota = "lots"\n', '[spaces.chat] quota: "lots" is not a size'),
    ('[policy]\nname = "mru"\n', "[policy] name: 'mru' is unknown (known: lfu, lru, priority"),
    ('[policy]\nname = "lfu"\nhalf_life = -1\n', "[policy] half_life: -1 must be > 0"),
    ('[gpu\n', "not valid TOML"),
])
def test_errors_name_file_key_and_remedy(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(kvtier.ConfigError) as err:
        kvtier.Config.from_file(str(path))
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_space_defaults_come_from_the_config(make_manager):
    mgr = make_manager(spaces={"chat": {"quota_bytes": 1 << 30, "priority": 7}})
    space = mgr.create_space("chat", max_tokens=1024, **make_manager.shape)
    assert space.priority == 7 and space.quota_bytes == 1 << 30


def test_config_check_command(tmp_path):
    good = sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml")))
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\nsize = "12 gigs"\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvtier.cli", "config", *a], capture_output=True,
                                    text=True, timeout=120)
    ok = run("check", *good)
    assert ok.returncode == 0 and ok.stdout.count("ok") == len(good)
    failed = run("check", str(bad))
    assert failed.returncode == 1 and "is not a size" in failed.stdout
    shown = run("show", good[0])
    assert shown.returncode == 0 and "host_size" in shown.stdout and "policy" in shown.stdout
