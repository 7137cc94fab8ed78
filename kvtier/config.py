"""One immutable configuration object for a :class:`kvtier.TierManager`, and its one schema.

Each setting is declared once, below: its type and validation, its default, its TOML section (the key is the
field's name less the section's prefix: ``host_size`` is ``[host] size``, ``gpu_low_watermark`` is
``[gpu] low_watermark``) and its environment variable (``KVTIER_`` + the name in capitals; ``KVTIER_DEBUG`` for
``debug_checks``). ``Config(...)``, ``Config.from_dict`` and ``Config.from_file`` all go through it, and apply
the environment the same way: a variable replaces the default; a value given explicitly (keyword or file) wins.

Sizes are bytes or strings such as ``"8GiB"``; ``kvtier config show`` prints a config back as TOML in the same
keys and units.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Annotated, Any, Iterator, Mapping

from pydantic import BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, TypeAdapter, ValidationError

from kvtier.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_BYTE_SIZE = TypeAdapter(ByteSize)


def _size(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. \"12GiB\" or a number of bytes)")
    if isinstance(value, str):
        try:
            return int(_BYTE_SIZE.validate_python(value))
        except ValidationError:
            raise ValueError(f"\"{value}\" is not a size (use e.g. \"12GiB\" or a number of bytes)") from None
    return value


def _budget(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return _size(value)
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"fraction {value} is outside (0, 1] (use e.g. 0.9, or a size such as \"60GiB\")")
    return value


def _device(value: Any) -> Any:
    if not (isinstance(value, str) and re.fullmatch(r"auto|(cpu|cuda)(:\d+)?", value)):
        raise ValueError(f"{value!r} is not a device (use 'auto', 'cpu', 'cuda' or 'cuda:N'; 'cpu:N' stands in for "
                         "a device N of its own on the CPU backend)")
    return value


Size = Annotated[int, BeforeValidator(_size), Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def _setting(default: Any, section: str, doc: str, env: str | None = "", size: bool = False, **checks: Any) -> Any:
    """A field of the schema: its TOML section, environment variable and whether it is a size (printed with
    units) ride along as metadata."""
    return Field(default, description=doc, json_schema_extra={"section": section, "env": env, "size": size},
                 **checks)


class Config(BaseModel):
    """Settings of one manager (one device's page pool and the spaces on it). Every field has a default, so
    ``Config()`` works anywhere; ``config.replace(...)`` makes a changed copy (validated like a new one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # [gpu]
    device: Annotated[str, BeforeValidator(_device)] = _setting(
        "auto", "gpu", "auto (CUDA when usable, else cpu), cpu, cuda or cuda:N")
    page_size: Size | None = _setting(
        None, "gpu", "bytes per physical page (handle), a multiple of the backend's granularity (2 MiB on CUDA); "
        "unset: 8 MiB (see Choosing the page size)",
        size=True)
    pool_budget: Annotated[float | int, BeforeValidator(_budget)] = _setting(
        0.9, "gpu", "the most memory the page pool holds: bytes, or a fraction of the device's free memory at start",
        size=True)
    pool_ready: Size = _setting(256 * MiB, "gpu", "unused pages kept created ahead of need, the spaces' empty "
                                "mapped pages counted in (refill below half, release above twice); 0 turns it off",
                                size=True)
    space_reserve_pages: int = _setting(2, "gpu", "the most empty pages a space keeps mapped (reclaimed under "
                                        "pressure)", ge=0, strict=True)
    space_reserve_window_s: float = _setting(0.5, "gpu", "seconds: a space keeps as many empty pages mapped as its "
                                           "largest allocation of that long ago took (at least one, at most "
                                           "space_reserve_pages), and pages freed beyond that, within "
                                           "space_reserve_pages, for as long; 0: space_reserve_pages always",
                                           ge=0)
    gpu_low_watermark: Fraction = _setting(0.05, "gpu", "free-pool fraction below which the demoter starts")
    gpu_high_watermark: Fraction = _setting(0.10, "gpu", "free-pool fraction the demoter stops at")
    demote_on_allocate: bool = _setting(True, "gpu", "an allocate/prefetch short of pages demotes idle pages first",
                                        strict=True)
    background_demotion: bool = _setting(True, "gpu", "run the background demoter thread", strict=True)
    map_ahead: bool = _setting(True, "gpu", "the demoter maps fresh empty pages into each space, up to its "
                               "reserve (space_reserve_window_s), so that allocations find them mapped (no driver "
                               "call on the allocate path); needs background_demotion", strict=True)
    debug_checks: bool = _setting(False, "gpu", "verify the books after every call; poison demoted GPU pages",
                                  env="KVTIER_DEBUG", strict=True)
    # [host]
    host_size: Size = _setting(1 * GiB, "host", "pinned host tier, pinned chunk by chunk in the background",
                               size=True)
    host_chunk: Size = _setting(128 * MiB, "host", "bytes pinned at a time", size=True)
    host_pieces: int = _setting(4, "host", "a slot (one page of one region) splits into up to this many equal "
                                "pieces (a power of two): a page whose live bytes fit half or a quarter takes that "
                                "much, so short sequences take host memory in proportion to their KV; 1: whole "
                                "pages", ge=1, le=64, strict=True)
    keep_copies: bool = _setting(True, "host", "a page brought back up keeps its lower copy until it may be "
                                 "written (a token allocated in it, its sequence's last block on it, mark_written); "
                                 "offloading it again then copies nothing", strict=True)
    host_checksums: bool = _setting(True, "host", "a digest of each page written to host memory, taken on the GPU "
                                    "beside its copy down and checked on the GPU where it lands back before any "
                                    "step reads it (a mismatch: the page is lost, the engine recomputes); checked on "
                                    "the host on its way to NVMe (NVMe pages always have one)", strict=True)
    host_high_watermark: Fraction = _setting(0.90, "host", "host fraction above which pages cascade to NVMe")
    host_low_watermark: Fraction = _setting(0.80, "host", "host fraction the cascade stops at")
    # [nvme]
    nvme_dir: str | None = _setting(None, "nvme", "directory of the slot file (unset: a temporary file, deleted "
                                    "once open, so nothing is left behind however the process ends)")
    nvme_size: Size = _setting(4 * GiB, "nvme", "slot file size (reserved on disk at start, see preallocate)",
                               size=True)
    nvme_preallocate: bool = _setting(True, "nvme", "reserve nvme_size on disk at start (first writes run at full "
                                      "speed; a disk short of room is refused at start, not met later); false: a "
                                      "sparse file", strict=True)
    nvme_threads: int = _setting(4, "nvme", "I/O threads (kvikio's pool, or a POSIX pool)", ge=1, strict=True)
    nvme_direct: bool = _setting(True, "nvme", "O_DIRECT where the filesystem allows it", strict=True)
    nvme_persist: bool = _setting(False, "nvme", "keep the slot file and a journal of the cached (published) blocks "
                                  "on it in dir at close, so that a manager started later on dir finds them again "
                                  "(verified when first read); needs dir", strict=True)
    nvme_pieces: int = _setting(4, "nvme", "as [host] pieces, for the slot file: a page takes a slot of a half, a "
                                "quarter ... of a page when its live bytes fit", ge=1, le=64, strict=True)
    nvme_min_uses: int = _setting(0, "nvme", "admission filter: only pages used this often go to NVMe (0: off)",
                                  ge=0, strict=True)
    # [tiers]
    tiers: list[str] = _setting(["host", "nvme"], "tiers", "the lower tiers, nearest the GPU first: built-in "
                                "(host, nvme), registered (kvtier.tiering.register_tier) or plug-ins (entry points "
                                "kvtier.tiers); comma-separated in the environment")
    tier_settings: dict[str, dict[str, Any]] = _setting({}, "tiers", "a plug-in tier's own settings, [tiers.NAME] "
                                                        "(validated by its settings model)", env=None)
    # [remote]
    remote_backend: str | None = _setting(None, "remote", "a store shared by several machines for cached blocks, "
                                          "found by their content keys: valkey or mooncake (unset: none)",
                                          pattern="^(valkey|mooncake)$")
    remote_address: str = _setting("127.0.0.1:6379", "remote", "valkey: the server's host:port; mooncake: this "
                                   "host's address in the store (host, or host:port)")
    remote_master: str = _setting("127.0.0.1:50051", "remote", "mooncake: the master's host:port")
    remote_timeout_s: float = _setting(1.0, "remote", "deadline of a lookup or a read; past it the blocks are a "
                                       "miss (recomputed), never a wait", gt=0)
    remote_put_timeout_s: float = _setting(10.0, "remote", "deadline of a write (in the background)", gt=0)
    remote_buffer: Size = _setting(256 * MiB, "remote", "host staging memory for objects going to and coming from "
                                   "the store (registered once with mooncake); writes that find none free are "
                                   "dropped, not waited for", size=True)
    remote_object_bytes: Size = _setting(16 * MiB, "remote", "the most bytes of blocks in one object: a chain's "
                                         "blocks go in groups of this size (fewer keys in the store)", size=True)
    remote_segment: Size = _setting(0, "remote", "mooncake: memory this process lends to the store (the objects "
                                    "in it go when the process does); 0: the store's own servers hold them",
                                    size=True)
    remote_negative_ttl_s: float = _setting(2.0, "remote", "how long a key found absent is not asked for again",
                                            ge=0)
    remote_write: str = _setting("through", "remote", "through: whole blocks go to the store as they are offered "
                                 "(kept, published); none: this process only reads the store (a replica of a "
                                 "cache others fill)", pattern="^(through|none)$")
    # [metrics]
    metrics_port: int | None = _setting(None, "metrics", "serve Prometheus metrics on this port (0: any free "
                                        "one; unset: no endpoint); needs kvtier[metrics]", ge=0, le=65535,
                                        strict=True)
    metrics_addr: str = _setting("127.0.0.1", "metrics", "the address the metrics endpoint listens on")
    # [ledger]
    ledger_dir: str | None = _setting(None, "ledger", "share the device's pages with the machine's other kvtier "
                                      "processes through a ledger in this directory (e.g. /dev/shm); unset: this "
                                      "process alone")
    ledger_budget: Size | None = _setting(None, "ledger", "the device's budget for all processes together (the "
                                          "first process sets it; unset: its pool_budget); each process's own "
                                          "pool_budget is its limit", size=True)
    ledger_priority: int = _setting(0, "ledger", "this process's priority among the ledger's processes", strict=True)
    ledger_name: str | None = _setting(None, "ledger", "this process's name in kvtier ls (unset: its pid)")
    # [policy]: ``name`` and the policy's own parameters
    policy: str = _setting("lru", "policy", "eviction policy: lru, lfu, priority, a plug-in or module:Class")
    policy_params: dict[str, Any] = _setting({}, "policy", "the policy's own parameters (the other keys of "
                                             "[policy])", env=None)
    # [spaces.NAME]
    spaces: dict[str, "SpaceDefaults"] = _setting({}, "spaces", "per space name: quota_bytes, priority (the "
                                                  "defaults of create_space(NAME))", env=None)

    def __init__(self, **data: Any) -> None:
        origin = {name: "arg" for name in data}
        for name, var in _env_vars():
            if name not in data and var in os.environ:
                data[name], origin[name] = _from_env(name, os.environ[var]), var
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = _problems(exc, origin)
            policy = _policy_problem(data) if not any(n.startswith(("policy", "nvme_min_uses"))
                                                      for n, _ in error.problems) else None
            if policy is None:
                raise error from None
            problems = error.problems + [policy]  # every problem at once, the policy's parameters too
            raise ConfigError(_render(problems), problems) from None
        problems = self._cross_checks()
        if problems:
            raise ConfigError(_render(problems), problems)

    def _cross_checks(self) -> list[tuple[str, str]]:
        problems = []
        for low, high in (("gpu_low_watermark", "gpu_high_watermark"), ("host_low_watermark", "host_high_watermark")):
            if getattr(self, low) > getattr(self, high):
                problems.append((low, f"{getattr(self, low)} is above the high watermark {getattr(self, high)}"))
        for name in ("host_pieces", "nvme_pieces"):
            if getattr(self, name) & (getattr(self, name) - 1):
                problems.append((name, f"{getattr(self, name)} is not a power of two (1, 2, 4 ... 64)"))
        if self.nvme_persist and self.nvme_dir is None:
            problems.append(("nvme_persist", "a cache kept across restarts needs a directory of its own; set "
                                             "[nvme] dir"))
        if isinstance(self.pool_budget, int) and self.pool_budget < (self.page_size or 2 * MiB):
            problems.append(("pool_budget", f"{self.pool_budget} bytes is less than one page (for a fraction "
                                            "write e.g. 0.9, for bytes a size such as \"60GiB\")"))
        policy = _policy_problem({"policy": self.policy, "nvme_min_uses": self.nvme_min_uses,
                                  "policy_params": self.policy_params})
        from kvtier.tiering.tiers.registry import section_problems  # names only: no tier's code is imported here
        return problems + ([policy] if policy else []) + section_problems(self)

    # --- other ways in -----------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> "Config":
        """Load a TOML config file (see ``configs/``); unknown keys and bad values raise ConfigError naming the
        file and the key (every problem, one per line). Keyword ``overrides`` win over the file."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, str(path), **overrides)

    @classmethod
    def check_file(cls, path: str) -> tuple["Config | None", list[tuple[str, str]]]:
        """Every problem of a config file at once, in the file's own names (unknown keys, bad values, settings that
        disagree), and the config made of its good settings (None where there is none): ``config check``."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            return None, [("", f"cannot read it ({exc.strerror})")]
        except tomllib.TOMLDecodeError as exc:
            return None, [("", f"not valid TOML: {exc}")]
        flat, problems = _flatten(data)
        try:
            return cls(**flat), problems
        except ConfigError as exc:
            problems += [(_toml_name(name), msg) for name, msg in exc.problems]
            bad = {name.split(".")[0] for name, _ in exc.problems}
        if "" in bad:  # the policy's name or parameters
            bad |= {"policy", "policy_params", "nvme_min_uses"}
        try:
            return cls(**{k: v for k, v in flat.items() if k not in bad}), problems
        except ConfigError:
            return None, problems

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>", **overrides: Any) -> "Config":
        """The same, from a mapping shaped like the file (``{"gpu": {...}, "host": {...}, ...}``)."""
        flat, problems = _flatten(data)
        if not problems:
            try:
                return cls(**{**flat, **overrides})
            except ConfigError as exc:
                problems = [(_toml_name(name), msg) for name, msg in exc.problems]
        raise ConfigError(_render(problems, f"{source}: "), problems)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated like a new one)."""
        return Config(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})

    def to_toml(self) -> str:
        """The config as a TOML file in the file's own keys and units (``config check`` accepts it)."""
        import tomli_w
        sections: dict[str, dict[str, Any]] = {}
        unset = []
        for name, section, key, value in _items(self):
            if value is None:
                unset.append(f"# [{section}] {key}: unset")
            elif name == "policy_params":
                sections.setdefault(section, {}).update(value)
            elif name == "spaces":
                if value:
                    sections[section] = {n: _space_toml(s) for n, s in value.items()}
            elif name == "tier_settings":
                sections.setdefault(section, {}).update({n: dict(v) for n, v in value.items()})
            else:
                sized = _meta(name)["size"] and isinstance(value, int)
                sections.setdefault(section, {})[key] = _human(value) if sized else value
        return "\n".join(unset + [""]) + tomli_w.dumps(sections)


class SpaceDefaults(BaseModel):
    """``[spaces.NAME]``: what ``create_space(NAME)`` takes when not given it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    quota_bytes: Size | None = None
    priority: int = 0

    def get(self, key: str, default: Any = None) -> Any:  # dict-like, as the manager reads it
        value = getattr(self, key, None)
        return default if value is None else value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.model_dump() == dict(other)
        return super().__eq__(other)


Config.model_rebuild()
# keys of earlier releases, still read (with a warning)
_ALIASES = {("host", "pin_chunk"): "chunk", ("nvme", "directory"): "dir",
            ("gpu", "reserve_pages"): "space_reserve_pages"}
_SPACE_ALIASES = {"quota": "quota_bytes"}


def _meta(name: str) -> dict[str, Any]:
    return Config.model_fields[name].json_schema_extra  # type: ignore[return-value]


def _env_vars() -> Iterator[tuple[str, str]]:
    for name in Config.model_fields:
        env = _meta(name)["env"]
        if env is not None:
            yield name, env or f"KVTIER_{name.upper()}"


def _from_env(name: str, raw: str) -> Any:
    kind = Config.model_fields[name].annotation
    if name == "tiers":
        return [t.strip() for t in raw.split(",") if t.strip()]
    if kind is int and raw.strip().lstrip("-").isdigit():
        return int(raw)
    if kind is bool:
        word = raw.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", ""):
            return False
    return raw  # validated (and refused, naming the variable) like any other value


def _toml_key(name: str) -> tuple[str, str]:
    section = _meta(name)["section"]
    return section, {"policy": "name", "tiers": "order"}.get(name) or name.removeprefix(section + "_")


def toml_name(name: str) -> str:
    """A setting's name in the file (``[gpu] page_size``) from its name in code (``page_size``)."""
    return _toml_name(name)


def _toml_name(name: str) -> str:
    if name.startswith("KVTIER_") or not name:
        return name
    field, _, rest = name.partition(".")
    if field == "tier_settings" and rest:
        tier, _, key = rest.partition(".")
        return f"[tiers.{tier}] {key}".rstrip()
    if field == "spaces" and rest:
        space, _, key = rest.partition(".")
        return f"[spaces.{space}] {key}".rstrip()
    section, key = _toml_key(field)
    return f"[{section}] {key}"


def _items(config: Config) -> Iterator[tuple[str, str, str, Any]]:
    for name in Config.model_fields:
        yield (name, *_toml_key(name), getattr(config, name))


def _flatten(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """File-shaped data -> Config keywords, and the problems found (unknown sections and keys)."""
    by_key = {_toml_key(name): name for name in Config.model_fields
              if name not in ("policy_params", "spaces", "tier_settings")}
    sections = sorted({s for s, _ in by_key} | {"spaces"})
    flat: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for section, values in data.items():
        if section not in sections:
            problems.append((f"[{section}]", f"unknown key (known: {', '.join(sections)})"))
        elif not isinstance(values, Mapping):
            problems.append((f"[{section}]", f"{values!r}: a section (a table) is wanted"))
        elif section == "spaces":
            flat["spaces"] = {n: {_SPACE_ALIASES.get(k, k): v for k, v in (s.items() if isinstance(s, Mapping) else s)}
                              for n, s in values.items()}
        else:
            for key, value in values.items():
                if (section, key) in _ALIASES:
                    log.warning("config: [%s] %s is now spelt %s", section, key, _ALIASES[(section, key)])
                    key = _ALIASES[(section, key)]
                if (section, key) in by_key:
                    flat[by_key[(section, key)]] = value
                elif section == "tiers" and isinstance(value, Mapping):  # [tiers.NAME]: a tier's own section
                    flat.setdefault("tier_settings", {})[key] = dict(value)
                elif section == "policy":
                    flat.setdefault("policy_params", {})[key] = value
                else:
                    known = ", ".join(k for s, k in by_key if s == section)
                    problems.append((f"[{section}] {key}", f"unknown key (known: {known})"))
    return flat, problems


def _problems(exc: ValidationError, origin: Mapping[str, str]) -> ConfigError:
    """One (field, message) per key, rendered with field names (or the environment variable it came from)."""
    seen, problems = set(), []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and (x in ("float", "int", "str", "none")
                                                                            or "[" in x or x.startswith("function-")))]
        name = ".".join(loc)
        if name in seen:  # a union reports each branch; one line per key is enough
            continue
        seen.add(name)
        value, msg = err.get("input"), err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown setting (known: {', '.join(Config.model_fields)})" if len(loc) == 1 else "unknown key"
        elif not msg.startswith(("fraction", "\"", repr(value))):
            msg = f"{value!r}: {msg}"
        key = origin.get(loc[0], "arg") if loc else "arg"
        problems.append((key if key != "arg" else name, msg))
    return ConfigError(_render(problems), problems)


def _policy_problem(data: Mapping[str, Any], load: bool = False) -> tuple[str, str] | None:
    """What is wrong with the policy named in ``data`` and its parameters, or None. A built-in (registered) one
    is built with its parameters; a plug-in or a ``module:Class`` path is only named here -- its code is imported
    and run only with ``load`` (the manager's start, ``config check`` on this machine), never by reading a file."""
    from kvtier.policies import make_policy
    from kvtier.policies.registry import policy_source
    name = data.get("policy", "lru")
    if not isinstance(name, str):
        return None  # the schema reports its type
    source = policy_source(name)
    if source is None:
        from kvtier.policies.registry import known_policies
        return ("", f"[policy] name: {name!r} is unknown (known: {', '.join(known_policies())}; or give a "
                    "'module:Class' path)")
    if source != "registered" and not load:
        return None
    try:
        make_policy(name, data.get("nvme_min_uses", 0), **dict(data.get("policy_params", {})))
    except ConfigError as exc:
        return ("", str(exc))
    except Exception:  # noqa: BLE001 - a value of the wrong type: the schema reports that one
        return None
    return None


def policy_problem(config: "Config") -> tuple[str, str] | None:
    """The config's policy built with its parameters, its code imported and run (plug-ins and module paths too):
    None, or what is wrong."""
    return _policy_problem({"policy": config.policy, "nvme_min_uses": config.nvme_min_uses,
                            "policy_params": config.policy_params}, load=True)


def render_problems(problems: list[tuple[str, str]], source: str = "") -> str:
    """(setting, message) pairs as lines in the file's own names (``[gpu] page_size: ...``)."""
    return _render([(_toml_name(name), msg) for name, msg in problems], source)


def _render(problems: list[tuple[str, str]], source: str = "") -> str:
    return "\n".join(f"{source}{where}{': ' if where else ''}{msg}" for where, msg in problems)


def _human(nbytes: int) -> int | str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return nbytes


def _space_toml(space: SpaceDefaults) -> dict[str, Any]:
    out: dict[str, Any] = {"priority": space.priority}
    if space.quota_bytes is not None:
        out["quota_bytes"] = _human(space.quota_bytes)
    return out


def settings_table() -> str:
    """The README's table of every setting: name in code, key in the file, environment variable, default."""
    env = dict(_env_vars())
    rows = ["| setting | file | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, f in Config.model_fields.items():
        where = {"policy_params": "[policy] ...", "spaces": "[spaces.NAME]",
                 "tier_settings": "[tiers.NAME]"}.get(name) or _toml_name(name)
        value = f.default
        shown = ("unset" if value is None else f"`{str(value).lower()}`" if isinstance(value, bool)
                 else f"`{_human(value)}`" if _meta(name)["size"] and isinstance(value, int) else f"`{value}`")
        rows.append(f"| `{name}` | `{where}` | {f'`{env[name]}`' if name in env else ''} | {shown} | "
                    f"{f.description} |")
    return "\n".join(rows)

