"""Read tensors out of a pickled torch checkpoint without running any of its code.

Some upstream releases (MPS: `MPS_overall_checkpoint.pth`) are `torch.save(model)` of a whole
`nn.Module`. Loading those with plain pickle imports and calls whatever the file names, which is
arbitrary code execution. `torch.load(weights_only=True)` refuses them because they name classes.

`RestrictedUnpickler` sits between the two: every global the pickle names becomes an inert stand-in
class (it records its constructor arguments and state, imports nothing, calls nothing), except the
handful of torch/collections callables needed to rebuild tensors, which are torch's own rebuild
functions. The result is a tree of stand-in objects whose `__dict__` holds what the real modules
had; `read_module_tensors` walks `_parameters`, `_buffers` and `_modules` of that tree and returns
the same flat `{dotted.name: tensor}` dict that `module.state_dict()` would have given.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.serialization import StorageType


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # torch's own rebuild, minus the pickled backward hooks (they could hold stand-ins meant as callables).
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    # Plain Parameter without pickled hooks or attribute state: only the data matters here.
    return torch._utils._rebuild_parameter(data, False, collections.OrderedDict())


def _rebuild_from_type(func, new_type, args, state):
    # Tensors with Python attributes are wrapped this way; keep the plain tensor, drop type and state.
    if func in (_rebuild_tensor, _rebuild_parameter):
        return func(*args)
    raise pickle.UnpicklingError("tensor rebuilt by a function that is not a torch rebuild function")


# The only callables the pickle may invoke. Each rebuilds data; none can reach the OS.
_ALLOWED_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
}


class StandIn:
    """Inert replacement for any class or function a pickle names.

    Constructing one stores the arguments; `__setstate__` stores the pickled state in `__dict__`
    (that is where an `nn.Module` keeps `_parameters`, `_buffers`, `_modules`). Nothing else runs.
    """

    _pickled_global = ("?", "?")

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_standin_args"] = args
        obj.__dict__["_standin_items"] = []
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args): keep them, do nothing
        pass

    def __setstate__(self, state):
        # Pickled state is a dict, or (dict, slot_dict) for objects with __slots__. The stand-in's own
        # bookkeeping (`_standin_*`) is not the file's to replace.
        if isinstance(state, (tuple, dict)) and (isinstance(state, dict) or len(state) == 2):
            for part in (state,) if isinstance(state, dict) else state:
                if isinstance(part, dict):
                    self.__dict__.update({k: v for k, v in part.items() if isinstance(k, str) and not k.startswith("_standin_")})
        else:
            self.__dict__["_standin_state"] = state

    # APPENDS / SETITEMS on list- or dict-like pickled objects land here.
    def append(self, item):
        self.__dict__["_standin_items"].append(item)

    def extend(self, items):
        self.__dict__["_standin_items"].extend(items)

    def __setitem__(self, key, value):
        self.__dict__["_standin_items"].append((key, value))

    def __repr__(self):
        module, name = self._pickled_global
        return f"<stand-in for {module}.{name}>"


def _refuse(opcode: str, target) -> None:
    what = getattr(target, "__qualname__", None) or type(target).__name__
    raise pickle.UnpicklingError(
        f"refused: {opcode} on {type(target).__name__} {what!r}; a checkpoint may only fill in the objects it "
        "creates (stand-ins, dicts, lists), never change a function, class or module of the loading process")


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickles the `data.pkl` of a torch zip checkpoint into stand-ins plus real tensors.

    The pure-Python unpickler, so that the opcodes that change an existing object (BUILD, SETITEM(S),
    APPEND(S), ADDITEMS) can be confined to plain data this unpickler made itself: `find_class` hands out
    live functions (torch's rebuilds, `OrderedDict`), and BUILD on one of those would set attributes of
    the loading process's own objects (`__defaults__`, `__dict__`)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, zip_file: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._zip = zip_file
        self._prefix = prefix
        self._storages: dict[str, torch.storage.TypedStorage] = {}
        self._standins: dict[tuple[str, str], type] = {}

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, StandIn):  # an instance: stand-in classes are types, not StandIn instances
            StandIn.__setstate__(inst, state)  # not inst.__setstate__: its __dict__ could shadow the method
        elif type(inst) is collections.OrderedDict and isinstance(state, dict):
            # A state_dict's `_metadata` attribute: an OrderedDict this pickle built, plain data on it.
            inst.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
        else:
            _refuse("BUILD", inst)

    dispatch[pickle.BUILD[0]] = load_build

    def _set_items(self, target, items: list, opcode: str) -> None:
        if type(target) in (dict, collections.OrderedDict):
            for k, v in zip(items[::2], items[1::2]):
                target[k] = v
        elif isinstance(target, StandIn):
            for k, v in zip(items[::2], items[1::2]):
                StandIn.__setitem__(target, k, v)
        else:
            _refuse(opcode, target)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items(self.stack[-1], [key, value], "SETITEM")

    def load_setitems(self):
        items = self.pop_mark()
        self._set_items(self.stack[-1], items, "SETITEMS")

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def _append(self, target, items: list, opcode: str) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, StandIn):
            StandIn.extend(target, items)
        else:
            _refuse(opcode, target)

    def load_append(self):
        item = self.stack.pop()
        self._append(self.stack[-1], [item], "APPEND")

    def load_appends(self):
        items = self.pop_mark()
        self._append(self.stack[-1], items, "APPENDS")

    def load_additems(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not set:
            _refuse("ADDITEMS", self.stack[-1])
        self.stack[-1].update(items)

    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            try:  # torch's own name -> dtype table; a marker object, not a class to call
                return StorageType(name)
            except (KeyError, AttributeError):
                pass
        key = (module, name)
        if key not in self._standins:
            self._standins[key] = type(name, (StandIn,), {"_pickled_global": key})
        return self._standins[key]

    def persistent_load(self, saved_id):
        # torch.save writes ("storage", storage_type, key, location, numel) for every storage.
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {saved_id!r:.200}")
        _, storage_type, key, _location, numel = saved_id
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            if isinstance(storage_type, StorageType):
                dtype = storage_type.dtype
            elif isinstance(storage_type, type) and issubclass(storage_type, StandIn) and storage_type._pickled_global == ("torch", "UntypedStorage"):
                dtype = torch.uint8
            else:
                raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
            raw = self._zip.read(f"{self._prefix}data/{key}")
            nbytes = numel * torch._utils._element_size(dtype)
            if len(raw) != nbytes:
                raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes on disk, expected {nbytes}")
            # Always CPU: the saved device ("cuda:0") is ignored on purpose.
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self._storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self._storages[key]


def _zip_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    for name in zf.namelist():
        if name.endswith("data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    raise ValueError(f"{path}: not a torch zip checkpoint (no <archive>/data.pkl record)")


def restricted_load(path: str | Path):
    """Unpickle a torch zip checkpoint into stand-ins and CPU tensors, executing none of its code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch zip checkpoint (legacy non-zip torch.save files are not supported)")
    with zipfile.ZipFile(path) as zf:
        prefix = _zip_prefix(zf, path)
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder") != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        unpickler = RestrictedUnpickler(io.BytesIO(zf.read(f"{prefix}data.pkl")), zf, prefix)
        try:
            return unpickler.load()
        # The pure-Python unpickler reports a malformed stream with these too (stack, memo, short read).
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError,
                struct.error) as err:
            raise ValueError(f"{path}: could not read checkpoint: {err}") from err


def _is_module_like(obj) -> bool:
    return isinstance(obj, StandIn) and isinstance(obj.__dict__.get("_modules"), dict) and isinstance(
        obj.__dict__.get("_parameters"), dict
    )


def _walk(obj, prefix: str, out: dict[str, torch.Tensor], ancestors: tuple[int, ...]) -> None:
    # Same traversal as nn.Module.state_dict: own params, persistent buffers, then children.
    state = obj.__dict__
    for name, value in state["_parameters"].items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if isinstance(value, torch.Tensor) and name not in non_persistent:
            out[prefix + name] = value.detach()
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not _is_module_like(child):
            raise ValueError(f"submodule {prefix + name} is not a module")
        if id(child) in ancestors:
            raise ValueError(f"module cycle at {prefix + name}")
        _walk(child, f"{prefix}{name}.", out, ancestors + (id(child),))


def read_module_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Flat `{dotted_name: tensor}` of every parameter and persistent buffer in a pickled module.

    Accepts `torch.save(module)` files (walks the module tree, like `module.state_dict()`) and
    plain `torch.save(state_dict)` files (returned as they are). Anything else is an error.
    """
    path = Path(path)
    root = restricted_load(path)
    if _is_module_like(root):
        out: dict[str, torch.Tensor] = {}
        _walk(root, "", out, (id(root),))
        if not out:
            raise ValueError(f"{path}: the pickled module holds no tensors")
        return out
    if isinstance(root, dict) and root and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in root.items()):
        return {k: v.detach() for k, v in root.items()}
    raise ValueError(f"{path}: expected a pickled nn.Module or a state_dict, found {type(root).__name__}")


def convert_mps_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """One-time conversion of the pickled MPS release to safetensors (`layton convert mps`).

    The safetensors file holds exactly the tensors `read_module_tensors` finds, under the same
    names (`model.text_model...`, `cross_model.layers...`), so `MPSScorer.from_release` gives the
    same scores from either file.
    """
    src, dst = Path(src), Path(dst)
    tensors = read_module_tensors(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous, non-aliasing tensors.
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(dst), metadata={"source": src.name})
    return dst

