"""Profile checkpoints as data: JSON of numbers, strings and lists, never pickle.

A checkpoint is the state of a :class:`~.profile.TaskProfile` and its forecaster (our own
classes, and the River models inside some of them) written as JSON, then zlib-compressed.  An
object is stored as its class name and its attributes; loading looks the class up in a fixed
allow-list (rswap's prediction classes and River's), makes an instance without running its
``__init__`` and sets those attributes.  Nothing in a file names a function to call, so a
replaced ``profiles.db`` can at worst give wrong forecasts, never run code (pickle runs whatever
a file names: it is what made a world-writable state directory a root exploit).

>>> from rswap_ebpf.predict.forecasters import SeasonalNaive
>>> s = SeasonalNaive(period=3)
>>> for y in (0.0, 0.0, 9.0):
...     s.learn_one(y)
>>> loads(dumps(s)).forecast(4)
[0.0, 0.0, 9.0, 0.0]
>>> loads(b"\\x80\\x04K\\x01.")  # a pickle
Traceback (most recent call last):
...
rswap_ebpf.predict.checkpoint.CheckpointError: not a checkpoint of this format (an older pickle?)
"""
from __future__ import annotations

import base64
import enum
import importlib
import json
import zlib
from collections import Counter, OrderedDict, defaultdict, deque
from typing import Any

MAGIC = b"RJ1"

#: modules whose classes a checkpoint may name (an exact module, or a package and below)
ALLOWED_MODULES = ("rswap_ebpf.predict", "rswap_ebpf.model.resources", "river")

#: what a ``defaultdict``'s default may be: a type to call with no arguments
_FACTORIES = {"float": float, "int": int, "list": list, "dict": dict}


class CheckpointError(ValueError):
    """A blob that is not a checkpoint of this format, or names a class outside the allow-list."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in ALLOWED_MODULES)


def _resolve(name: str) -> type:
    module, _, qual = name.partition(":")
    if not _allowed(module) or not qual or any(p.startswith("__") for p in qual.split(".")):
        raise CheckpointError(f"class {name!r} is not one a checkpoint may hold")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"class {name!r}: {err}") from None
    if not isinstance(obj, type) or not _allowed(obj.__module__):
        raise CheckpointError(f"{name!r} is not a class a checkpoint may hold")
    return obj


def _custom_state(cls: type) -> bool:
    """Whether ``cls`` (or a base of ours) defines its own compact ``__getstate__``."""
    for base in cls.__mro__:
        if base is object:
            return False
        if "__getstate__" in base.__dict__:
            return True
    return False


class _Encoder:
    def __init__(self) -> None:
        self._ids: dict[int, int] = {}
        self._keep: list[Any] = []  # holds objects alive so their ids stay unique

    def enc(self, o: Any) -> Any:
        if o is None or isinstance(o, (bool, str)):
            return o
        t = type(o)
        if t is int or t is float:
            return o
        if isinstance(o, enum.Enum):
            return {"$enum": _qualname(t), "v": self.enc(o.value)}
        if t is list:
            return [self.enc(v) for v in o]
        if t is tuple:
            return {"$tu": [self.enc(v) for v in o]}
        if t is dict:
            return self._dict(o)
        if t is deque:
            return {"$dq": [self.enc(v) for v in o], "n": o.maxlen}
        if t in (bytes, bytearray):
            return {"$b": base64.b64encode(bytes(o)).decode("ascii")}
        if t in (set, frozenset):
            return {"$set" if t is set else "$fs": [self.enc(v) for v in sorted(o, key=repr)]}
        if t is OrderedDict:
            return {"$od": [[self.enc(k), self.enc(v)] for k, v in o.items()]}
        if t is Counter:
            return {"$ctr": [[self.enc(k), self.enc(v)] for k, v in o.items()]}
        if t is defaultdict:
            factory = getattr(o.default_factory, "__name__", None)
            if o.default_factory is not None and _FACTORIES.get(factory) is not o.default_factory:
                raise CheckpointError(f"defaultdict of {o.default_factory!r} cannot be stored")
            return {"$dd": [[self.enc(k), self.enc(v)] for k, v in o.items()],
                    "f": factory}
        if t.__name__ == "VectorDict" and t.__module__.startswith("river"):
            return {"$vd": self._dict(o.to_dict())}
        return self._object(o)

    def _dict(self, d: dict) -> Any:
        if all(type(k) is str and not k.startswith("$") for k in d):
            return {k: self.enc(v) for k, v in d.items()}
        return {"$d": [[self.enc(k), self.enc(v)] for k, v in d.items()]}

    def _object(self, o: Any) -> dict:
        t = type(o)
        if not _allowed(t.__module__) or not hasattr(o, "__dict__"):
            raise CheckpointError(f"{_qualname(t)} cannot be stored in a checkpoint")
        seen = self._ids.get(id(o))
        if seen is not None:
            return {"$ref": seen}
        n = self._ids[id(o)] = len(self._ids)
        self._keep.append(o)
        out: dict[str, Any] = {"$o": _qualname(t), "i": n}
        if isinstance(o, deque):
            out["items"], out["n"] = [self.enc(v) for v in o], o.maxlen
        elif isinstance(o, list):
            out["items"] = [self.enc(v) for v in o]
        elif isinstance(o, dict):
            out["items"] = [[self.enc(k), self.enc(v)] for k, v in o.items()]
        state = o.__getstate__() if _custom_state(t) else o.__dict__
        out["s"] = self.enc(state)
        return out


class _Decoder:
    def __init__(self) -> None:
        self._objs: dict[int, Any] = {}

    def dec(self, o: Any) -> Any:
        if isinstance(o, list):
            return [self.dec(v) for v in o]
        if not isinstance(o, dict):
            return o
        if not any(k.startswith("$") for k in o):
            return {k: self.dec(v) for k, v in o.items()}
        if "$o" in o:
            return self._object(o)
        if "$ref" in o:
            try:
                return self._objs[o["$ref"]]
            except (KeyError, TypeError):
                raise CheckpointError(f"reference to an unknown object {o['$ref']!r}") from None
        if "$tu" in o:
            return tuple(self.dec(v) for v in o["$tu"])
        if "$d" in o:
            return {self._key(k): self.dec(v) for k, v in o["$d"]}
        if "$dq" in o:
            return deque((self.dec(v) for v in o["$dq"]), maxlen=o.get("n"))
        if "$b" in o:
            return base64.b64decode(o["$b"], validate=True)
        if "$set" in o:
            return {self._key(v) for v in o["$set"]}
        if "$fs" in o:
            return frozenset(self._key(v) for v in o["$fs"])
        if "$od" in o:
            return OrderedDict((self._key(k), self.dec(v)) for k, v in o["$od"])
        if "$ctr" in o:
            return Counter({self._key(k): self.dec(v) for k, v in o["$ctr"]})
        if "$dd" in o:
            f = o.get("f")
            if f is not None and f not in _FACTORIES:
                raise CheckpointError(f"defaultdict of {f!r} is not allowed")
            return defaultdict(_FACTORIES.get(f), {self._key(k): self.dec(v) for k, v in o["$dd"]})
        if "$vd" in o:
            from river.utils import VectorDict

            return VectorDict(self.dec(o["$vd"]))
        if "$enum" in o:
            cls = _resolve(o["$enum"])
            if not issubclass(cls, enum.Enum):
                raise CheckpointError(f"{o['$enum']!r} is not an enumeration")
            return cls(self.dec(o["v"]))
        raise CheckpointError(f"unknown tag in {sorted(o)!r}")

    def _key(self, k: Any) -> Any:
        v = self.dec(k)
        if isinstance(v, (list, dict)):
            raise CheckpointError("a mapping key must be a plain value")
        return v

    def _object(self, o: dict) -> Any:
        cls = _resolve(o["$o"])
        obj = cls.__new__(cls)
        self._objs[o.get("i")] = obj  # before its attributes: they may refer back to it
        if isinstance(obj, deque):
            deque.__init__(obj, (self.dec(v) for v in o.get("items", ())), o.get("n"))
        elif isinstance(obj, list):
            list.extend(obj, (self.dec(v) for v in o.get("items", ())))
        elif isinstance(obj, dict):
            dict.update(obj, ((self._key(k), self.dec(v)) for k, v in o.get("items", ())))
        state = self.dec(o.get("s", {}))
        if not isinstance(state, dict):
            raise CheckpointError(f"{o['$o']}: state is not a mapping")
        if _custom_state(cls) and hasattr(cls, "__setstate__"):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj


def dumps(obj: Any) -> bytes:
    """``obj`` as a checkpoint blob (``MAGIC`` + zlib-compressed JSON)."""
    text = json.dumps(_Encoder().enc(obj), separators=(",", ":"))
    return MAGIC + zlib.compress(text.encode("utf-8"), 6)


def loads(blob: bytes) -> Any:
    """The object a checkpoint blob holds; :class:`CheckpointError` for anything else."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:3]) != MAGIC:
        raise CheckpointError("not a checkpoint of this format (an older pickle?)")
    try:
        data = json.loads(zlib.decompress(bytes(blob[3:])).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"damaged checkpoint: {err}") from None
    try:
        return _Decoder().dec(data)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"damaged checkpoint: {type(err).__name__}: {err}") from None
