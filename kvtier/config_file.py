"""Policy config files (TOML): schema, validation and conversion to :class:`kvtier.Config`.

Validation is pydantic's: unknown keys are errors, sizes are byte counts or strings such as ``"8GiB"``, and
every message names the file, the section and key, and what to write instead.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvtier.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _watermarks_ordered(section: Any) -> Any:
    if section.low_watermark > section.high_watermark:
        raise ValueError(f"low_watermark {section.low_watermark} is above high_watermark {section.high_watermark}")
    return section


class GpuSection(_Section):
    device: str = "auto"
    page_size: ByteSize | None = None
    pool_budget: float | ByteSize = Field(0.9, description="a fraction of free memory, or a size")
    pool_ready: ByteSize = ByteSize(256 << 20)
    reserve_pages: int = Field(2, ge=0)
    low_watermark: float = Field(0.05, ge=0, le=1)
    high_watermark: float = Field(0.10, ge=0, le=1)
    demote_on_allocate: bool = True
    background_demotion: bool = True
    debug_checks: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "GpuSection":
        return _watermarks_ordered(self)

    @field_validator("pool_budget", mode="before")
    @classmethod
    def _fraction_or_size(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("a fraction must lie in (0, 1]; for bytes write a size such as \"60GiB\"")
        if isinstance(value, str):
            return ByteSize._validate(value, None)  # type: ignore[attr-defined]
        return value


class HostSection(_Section):
    size: ByteSize = ByteSize(1 << 30)
    pin_chunk: ByteSize = ByteSize(128 << 20)
    keep_copies: bool = True
    high_watermark: float = Field(0.90, ge=0, le=1)
    low_watermark: float = Field(0.80, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "HostSection":
        return _watermarks_ordered(self)


class NvmeSection(_Section):
    directory: str | None = None
    size: ByteSize = ByteSize(4 << 30)
    threads: int = Field(4, ge=1)
    direct: bool = True
    min_uses: int = Field(0, ge=0, description="NVMe admission filter: pages used fewer times stay above")


class PolicySection(BaseModel):
    model_config = ConfigDict(extra="allow")  # the policy's own parameters, checked by the policy
    name: str = "lru"


class SpaceSection(_Section):
    quota: ByteSize | None = None
    priority: int = 0


class ConfigFile(_Section):
    gpu: GpuSection = GpuSection()
    host: HostSection = HostSection()
    nvme: NvmeSection = NvmeSection()
    policy: PolicySection = PolicySection()
    spaces: dict[str, SpaceSection] = {}

    def to_kwargs(self) -> dict[str, Any]:
        g, h, n, p = self.gpu, self.host, self.nvme, self.policy
        budget = g.pool_budget if isinstance(g.pool_budget, float) and g.pool_budget <= 1 else int(g.pool_budget)
        return dict(
            device=g.device, page_size=int(g.page_size) if g.page_size is not None else None,
            pool_budget=budget, pool_ready=int(g.pool_ready), space_reserve_pages=g.reserve_pages,
            gpu_low_watermark=g.low_watermark, gpu_high_watermark=g.high_watermark,
            demote_on_allocate=g.demote_on_allocate, background_demotion=g.background_demotion,
            debug_checks=g.debug_checks, keep_copies=h.keep_copies, host_size=int(h.size), host_chunk=int(h.pin_chunk),
            host_high_watermark=h.high_watermark, host_low_watermark=h.low_watermark, nvme_dir=n.directory,
            nvme_size=int(n.size), nvme_threads=n.threads, nvme_direct=n.direct, nvme_min_uses=n.min_uses,
            policy=p.name, policy_params=dict(p.model_extra or {}),
            spaces={name: {"quota_bytes": int(s.quota) if s.quota is not None else None, "priority": s.priority}
                    for name, s in self.spaces.items()},
        )


def _where(loc: tuple[Any, ...]) -> str:
    """``("host", "size")`` -> ``[host] size``, skipping pydantic's names of union branches."""
    keys = [str(x) for x in loc
            if not (isinstance(x, str) and (x in ("float", "int") or "[" in x or x.startswith("constrained-")))]
    if not keys:
        return "(top level)"
    if keys[0] == "spaces" and len(keys) >= 2:
        return f"[spaces.{keys[1]}] {'.'.join(keys[2:])}".rstrip()
    return f"[{keys[0]}] {'.'.join(keys[1:])}".rstrip()


def _message(err: Mapping[str, Any], model: type[BaseModel]) -> str:
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        section = getattr(model.model_fields.get(err["loc"][0]), "annotation", None) if len(err["loc"]) > 1 else model
        known = ", ".join(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else ""
        return f"unknown key{f' (known: {known})' if known else ''}"
    if kind.startswith("byte_size") or (kind in ("int_parsing", "float_parsing") and isinstance(value, str)):
        return f"{value!r} is not a size (use e.g. \"12GiB\" or a number of bytes)".replace("'", '"')
    msg = err["msg"].removeprefix("Value error, ")
    return msg if isinstance(value, dict) else f"{value!r}: {msg}"


def parse_config(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a config mapping; return :class:`Config` keyword arguments, or raise ConfigError naming
    ``source``, the key and what is wrong (every problem, one per line)."""
    try:
        return ConfigFile.model_validate(dict(data)).to_kwargs()
    except ValidationError as exc:
        seen, lines = set(), []
        for err in exc.errors():
            where = _where(err["loc"])
            if where in seen:  # a union reports each branch; one line per key is enough
                continue
            seen.add(where)
            lines.append(f"{source}: {where}: {_message(err, ConfigFile)}")
        raise ConfigError("\n".join(lines)) from None


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path)
