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
                    '[policy]\nname = "priority"\naging_seconds = 5.0\n'
                    '[spaces.chat]\nquota_bytes = "1GiB"\npriority = 4\n')
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
    ('[host]\nsise = 3\n', "[host] sise: unknown key (known: size, chunk"),
    ('[tier]\nx = 1\n', "[tier]: unknown key (known: gpu, host, ledger, metrics, nvme, policy, remote, spaces, tiers)"),
    ('[tiers]\nx = 1\n', "[tiers] x: unknown key (known: order)"),
    ('[tiers]\norder = ["host", "ssd"]\n', "[tiers] order: 'ssd' is not a tier (known: host, nvme"),
    ('[tiers.ssd]\nsize = 1\n', "[tiers.ssd]: settings of a tier not in [tiers] order"),
    ('[tiers.host]\nsize = 1\n', "[tiers.host]: the host tier is set in its own section, not [tiers.host]"),
    ('[gpu]\npool_budget = 1.5\n', "[gpu] pool_budget: fraction 1.5 is outside (0, 1]"),
    ('[gpu]\npool_budget = 1\n', "[gpu] pool_budget: 1 bytes is less than one page"),
    ('[gpu]\ndevice = "gpu"\n', "[gpu] device: 'gpu' is not a device (use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ('[host]\nkeep_copies = "no"\n', "[host] keep_copies: 'no': Input should be a valid boolean"),
    ('[gpu]\nlow_watermark = 0.5\nhigh_watermark = 0.2\n', "[gpu] low_watermark: 0.5 is above the high watermark 0.2"),
    ('[nvme]\nthreads = 0\n', "[nvme] threads: 0: Input should be greater than or equal to 1"),
    ('[spaces.chat]\nquota_bytes = "lots"\n', '[spaces.chat] quota_bytes: "lots" is not a size'),
    ('[spaces.chat]\nquota_byte = 1\n', '[spaces.chat] quota_byte: unknown key'),
    ('[policy]\nname = "mru"\n', "[policy] name: 'mru' is unknown (known: lfu, lru, priority"),
    ('[policy]\nname = "lfu"\nhalf_life = -1\n', "[policy] half_life: -1 must be a number of seconds > 0"),
    ('[policy]\nname = "lfu"\nhalf_life = "ten"\n', "[policy] half_life: 'ten' must be a number of seconds > 0"),
    ('[policy]\nname = "lfu"\nhalf_lif = 3\n', "[policy] half_lif: not a parameter of the 'lfu' policy (its "
                                                "parameters: half_life)"),
    ('[spaces.chat]\npriority = "high"\n', "[spaces.chat] priority: 'high': Input should be a valid integer"),
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
    ok = run("check", "--schema-only", *good)  # some are for GPU machines: what they say is checked here
    assert ok.returncode == 0 and ok.stdout.count("ok") == len(good)
    failed = run("check", str(bad))
    assert failed.returncode == 1 and "is not a size" in failed.stdout
    # show prints TOML in the file's own keys and units, which check accepts and which loads back the same
    for path in good:
        shown = run("show", path)
        assert shown.returncode == 0 and "[host]\nsize = " in shown.stdout and "[policy]\nname = " in shown.stdout
        again = tmp_path / "again.toml"
        again.write_text(shown.stdout)
        assert run("check", "--schema-only", str(again)).returncode == 0
        assert kvtier.Config.from_file(str(again)) == kvtier.Config.from_file(path)


def test_one_schema_environment_applies_the_same_way_to_all_three(tmp_path, monkeypatch):
    # a variable replaces the default, in code, from a mapping and from a file alike
    monkeypatch.setenv("KVTIER_DEBUG", "1")
    monkeypatch.setenv("KVTIER_NVME_DIR", str(tmp_path))
    monkeypatch.setenv("KVTIER_HOST_SIZE", "2GiB")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for config in (kvtier.Config(), kvtier.Config.from_dict({}), kvtier.Config.from_file(str(empty))):
        assert config.debug_checks is True and config.nvme_dir == str(tmp_path) and config.host_size == 2 << 30
    # a value given explicitly wins over the variable: a keyword, a key of the file
    assert kvtier.Config(host_size=1 << 30).host_size == 1 << 30
    assert kvtier.Config.from_dict({"host": {"size": "1GiB"}}).host_size == 1 << 30
    # a bad variable is named in the error
    monkeypatch.setenv("KVTIER_NVME_THREADS", "many")
    with pytest.raises(kvtier.ConfigError, match="KVTIER_NVME_THREADS"):
        kvtier.Config()


def test_code_and_file_name_the_same_setting_the_same_way():
    # every field's TOML key is its name less the section prefix; both spellings reach the same value
    config = kvtier.Config.from_dict({"gpu": {"space_reserve_pages": 5, "low_watermark": 0.01},
                                      "host": {"chunk": "64MiB"}, "nvme": {"dir": "/tmp/x", "min_uses": 2}})
    assert config == kvtier.Config(space_reserve_pages=5, gpu_low_watermark=0.01, host_chunk=64 << 20,
                                   nvme_dir="/tmp/x", nvme_min_uses=2)
    # the keys of earlier releases still load
    old = kvtier.Config.from_dict({"gpu": {"reserve_pages": 5}, "host": {"pin_chunk": "64MiB"},
                                   "nvme": {"directory": "/tmp/x"}, "spaces": {"a": {"quota": "1GiB"}}})
    assert (old.space_reserve_pages, old.host_chunk, old.nvme_dir) == (5, 64 << 20, "/tmp/x")
    assert old.spaces["a"].quota_bytes == 1 << 30
    # and code gets the same checks the file gets
    with pytest.raises(kvtier.ConfigError, match="keep_copies"):
        kvtier.Config(keep_copies="no")
    with pytest.raises(kvtier.ConfigError, match="device: 'gpu' is not a device"):
        kvtier.Config(device="gpu")


def test_the_readme_lists_every_setting_as_the_schema_declares_it():
    readme = open(os.path.join(ROOT, "README.md")).read()
    from kvtier.config import settings_table
    for row in settings_table().splitlines():
        assert row in readme, f"README's settings table is out of date (regenerate it with settings_table()): {row}"


def _config_check(*args: str) -> subprocess.CompletedProcess:
    """``kvtier config check ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "config", "check", *args], capture_output=True,
                          text=True, timeout=120)


def test_config_check_is_a_full_pre_flight_on_this_machine(tmp_path):
    run = _config_check
    # a file the schema takes but this machine does not: every problem at once, each under its key
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = tmp_path / "big.toml"
    bad.write_text(f'[gpu]\ndevice = "cpu"\npool_budget = "64PiB"\n[host]\nsize = "64PiB"\n'
                   f'[nvme]\ndir = "{blocker}/slots"\n')
    said = run(str(bad))
    out = " ".join(said.stdout.split())
    assert said.returncode == 1, out
    for key in ("[gpu] pool_budget", "[host] size", "[nvme] dir"):
        assert key in out, (key, out)
    assert not said.stdout.startswith("ok") and run("--schema-only", str(bad)).returncode == 0
    # a file it takes is ok, and checking it wrote nothing: no NVMe or ledger directory, no lock, no slot file
    good = tmp_path / "good.toml"
    good.write_text(f'[gpu]\ndevice = "cpu"\npool_budget = "64MiB"\n[host]\nsize = "8MiB"\n'
                    f'[nvme]\nsize = "16MiB"\ndir = "{tmp_path}/slots"\n[ledger]\ndir = "{tmp_path}/ledger"\n')
    before = sorted(os.listdir(tmp_path))
    assert run(str(good)).stdout.startswith("ok")
    assert sorted(os.listdir(tmp_path)) == before


def test_every_problem_is_said_at_once_the_policys_too(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[gpu]\ndevice = "gpu"\n[policy]\nname = "lfu"\nhalf_lif = 3\n[spaces.a]\npriority = "high"\n')
    with pytest.raises(kvtier.ConfigError) as err:
        kvtier.Config.from_file(str(path))
    said = " ".join(str(err.value).split())
    assert len(err.value.problems) == 3
    for part in ("[gpu] device: 'gpu' is not a device", "[spaces.a] priority: 'high'",
                 "half_lif: not a parameter of the 'lfu' policy (its parameters: half_life)"):
        assert part in said, (part, said)


def test_config_check_never_runs_code_a_file_names_under_schema_only(tmp_path):
    run = _config_check
    # a file names a module:Class "policy" that would run a command: the schema check imports nothing
    marker = tmp_path / "ran"
    path = tmp_path / "evil.toml"
    path.write_text(f'[gpu]\ndevice = "cpu"\n[policy]\nname = "os:system"\ncommand = "touch {marker}"\n')
    assert run("--schema-only", str(path)).returncode == 0
    assert not marker.exists()
    # a name that is neither registered, a plug-in nor a module:Class path is refused without importing anything
    path.write_text('[policy]\nname = "no such policy"\n')
    said = run("--schema-only", str(path))
    assert said.returncode == 1 and "'no such policy' is unknown" in said.stdout


def test_config_check_says_every_problem_of_a_file_at_once_schema_and_machine(tmp_path):
    run = _config_check
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # an unknown key, a bad value, and two things this machine refuses: four lines, one run
    path = tmp_path / "many.toml"
    path.write_text(f'[gpu]\ndevice = "cpu"\npool_budget = "64PiB"\nwatermark = 3\n[host]\nsize = "lots"\n'
                    f'[nvme]\ndir = "{blocker}/slots"\n')
    said = run(str(path))
    out = " ".join(said.stdout.split())
    assert said.returncode == 1
    for part in ("[gpu] watermark: unknown key", "[host] size: \"lots\" is not a size", "[gpu] pool_budget",
                 "[nvme] dir"):
        assert part in out, (part, out)
