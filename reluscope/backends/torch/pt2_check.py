"""What a torch.export archive (.pt2) may hold and do, checked before torch reads any of it.

`torch.export.load` is not a data reader. In torch 2.13 it dlopens (or compiles) an AOTInductor
package under `data/aotinductor/`, unpickles weights and constants marked `use_pickle`,
`pickle.loads` "opaque" constants, runs the TorchScript unpickler on `custom_obj_` constants,
`eval`s every symbolic shape expression (`sympy.sympify`), `exec`s the archive's `guards_code`,
and pastes `forward_arg_names` and the keys of the input spec into Python source that it
compiles. The graph it builds may call any operator torch knows, `aten.from_file(shared=True)`
(maps any file for writing) included, or a Python callable named in the file.

So, unless the user passed --trust-checkpoint, an archive is analysed only when all of that is
known to be harmless before anything deserializes:

- members: exactly the exported-program layout (models/*.json, raw weight and tensor-constant
  records, their JSON configs, the sample inputs, version records, extra/ text files), compared
  case-insensitively (torch's zip reader finds members case-insensitively), no two names that
  differ only in case, and the same list as torch's own zip reader sees;
- weights and constants: raw tensor records only (no `use_pickle`, no opaque or custom objects);
- every graph node's target: a pure tensor op of an allow-list (no file, storage, process or
  import side effects, no custom ops, no Python callables, no subgraphs);
- every symbolic expression and guard: a plain arithmetic expression over shape symbols;
- names pasted into generated source: Python identifiers;
- the sample inputs: tensors and numbers in tuples, lists and identifier-keyed dicts (read with
  `torch.load(weights_only=True)`).

Files are read with torch's own zip reader (`PyTorchFileReader`, the one torch.export.load uses:
no unpickling, no deserializing), so the bytes checked here are the bytes torch would read.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from ...errors import InputError, UnsafeCheckpointError

TRUST = "Pass --trust-checkpoint only if you trust its source"

PICKLE_REFUSAL = ("refused to load {path}: it holds pickled Python objects beyond weights{what}, and unpickling "
                  "them runs code from the file. " + TRUST)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")
_NAME = r"[A-Za-z0-9_]+"
_LAYOUT = [re.compile(p + r"\Z") for p in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    rf"models/{_NAME}\.json",
    rf"data/weights/{_NAME}_weights_config\.json", r"data/weights/weight_[0-9]+",
    rf"data/constants/{_NAME}_constants_config\.json", r"data/constants/tensor_[0-9]+",
    rf"data/sample_inputs/{_NAME}\.pt",
    r"extra/[A-Za-z0-9_.\-/]+",  # torch reads these as text only
)]

# Pure tensor ops an exported model may call (aten overload packets; an in-place variant `relu_`
# of a listed op is allowed too, `out=` overloads are not). Nothing here touches files,
# storages, processes, imports or other devices' memory outside the tensors it is given.
PURE_ATEN_OPS = frozenset("""
linear addmm mm bmm matmul baddbmm addmv mv dot einsum t outer addbmm
conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d
batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
_native_batch_norm_legit_functional layer_norm native_layer_norm group_norm native_group_norm
instance_norm rms_norm _fused_rms_norm
relu relu6 hardtanh clamp clamp_min clamp_max clip leaky_relu prelu _prelu_kernel elu selu celu gelu
silu hardswish hardsigmoid mish sigmoid tanh softplus softsign log_sigmoid log_sigmoid_forward threshold
glu hardshrink softshrink tanhshrink logit
max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
_adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d
upsample_bicubic2d upsample_trilinear3d _upsample_nearest_exact1d _upsample_nearest_exact2d
_upsample_bilinear2d_aa pixel_shuffle pixel_unshuffle channel_shuffle
view reshape _unsafe_view flatten unflatten permute transpose swapaxes contiguous squeeze unsqueeze
expand expand_as repeat tile cat concat concatenate stack hstack vstack split split_with_sizes chunk
unbind slice select narrow index_select gather index index_put scatter scatter_add masked_fill
masked_select where alias clone detach flip roll movedim moveaxis tensor_split view_as reshape_as
pad constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d
replication_pad2d replication_pad3d _to_copy to type_as lift_fresh_copy zeros_like ones_like
empty_like full_like rand_like randn_like zeros ones full arange empty scalar_tensor new_zeros new_ones
new_full new_empty diagonal tril triu copy fill zero squeeze_copy unsqueeze_copy view_copy
permute_copy expand_copy t_copy transpose_copy slice_copy select_copy alias_copy split_copy
add sub rsub mul div neg pow sqrt rsqrt exp exp2 log log2 log10 log1p expm1 abs sign sgn floor ceil
round trunc frac reciprocal square sin cos tan asin acos atan atan2 sinh cosh erf erfc erfinv
maximum minimum fmax fmin max min amax amin aminmax sum mean var std var_mean std_mean prod norm
linalg_vector_norm frobenius_norm argmax argmin cumsum cumprod logcumsumexp eq ne lt le gt ge
logical_and logical_or logical_not logical_xor bitwise_not bitwise_and bitwise_or bitwise_xor
isnan isinf isfinite nan_to_num remainder fmod floor_divide lerp addcmul addcdiv topk sort argsort
any all softmax _softmax log_softmax _log_softmax _safe_softmax logsumexp cosine_similarity
pairwise_distance cdist
dropout native_dropout feature_dropout alpha_dropout feature_alpha_dropout embedding
embedding_renorm one_hot scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
_scaled_dot_product_attention_math
sym_size sym_stride sym_numel sym_storage_offset _assert_scalar _assert_tensor_metadata
_assert_async sym_constrain_range sym_constrain_range_for_size _local_scalar_dense item
""".split())
# Python callables an exported graph uses on tuples, shape integers and booleans.
PURE_PYTHON_TARGETS = frozenset(
    [f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                        "pos", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_",
                                        "pow", "abs")]
    + [f"torch.{name}" for name in ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite",
                                     "sym_sqrt", "_sym_sqrt")]
    + [f"math.{name}" for name in ("ceil", "floor", "sqrt", "trunc")])

# Argument and spec kinds that bring objects, subgraphs or effects into the graph.
_FORBIDDEN_KEYS = {"as_graph": "a subgraph (a higher-order op)", "as_custom_obj": "a custom object",
                   "as_operator": "an operator passed as an argument", "custom_obj": "a custom object input",
                   "token": "an effect token (an op with side effects)"}

# Names a symbolic expression may call (sympy's srepr and torch's shape functions).
_SYMPY_CALLS = frozenset("""
Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge StrictLessThan LessThan
StrictGreaterThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair floor ceiling sqrt
FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural
FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt
RoundDecimal ToFloat Identity cast_symbool_to_symint_guardless
""".split())
_SYMPY_NAMES = frozenset({"True", "False", "oo", "zoo", "nan", "true", "false", "inf"})
_POW_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
_SYMBOL_KWARGS = frozenset({"positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite",
                            "precision", "evaluate"})
_TENSOR_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_MAX_EXPR = 4000
_MAX_INT = 2**64
_SPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})


class Refusal(Exception):
    """Why an archive needs --trust-checkpoint (a clause that completes 'refused to load X: ...')."""


class PickleRefusal(Refusal):
    """The archive holds pickled objects: the refusal names them as such."""


def check_pt2(path: Path) -> None:
    """Raise UnsafeCheckpointError unless everything the archive can do on loading is known."""
    try:
        _check(path)
    except PickleRefusal as refusal:
        raise UnsafeCheckpointError(PICKLE_REFUSAL.format(path=path, what=f" ({refusal})")) from None
    except Refusal as refusal:
        raise UnsafeCheckpointError(f"refused to load {path}: {refusal}. Without --trust-checkpoint a .pt2 may "
                                    f"hold only weights and a graph of pure tensor ops. {TRUST}") from None


def _check(path: Path) -> None:
    names = _zip_names(path)
    root = _root(names)
    records = {name[len(root) + 1:] for name in names}
    lowered: dict[str, str] = {}
    for record in sorted(records):
        low = record.lower()
        if low in lowered:
            raise Refusal(f"it holds members {lowered[low]!r} and {record!r} whose names differ only in case "
                          "(torch's reader does not tell them apart)")
        lowered[low] = record
    for record in sorted(records):
        low = record.lower()
        if "opaque_obj_" in low or "custom_obj_" in low:
            raise PickleRefusal(f"an opaque or custom object {record!r} in a torch.export archive")
        if low.startswith("data/aotinductor/") or low.startswith("aotinductor/"):
            raise Refusal(f"it holds an AOTInductor package ({record}: native code that torch.export.load "
                          "would load and run)")
        if not any(pattern.match(record) for pattern in _LAYOUT):
            raise Refusal(f"it holds {record!r}, which is not part of an exported program's layout")

    reader = _torch_reader(path)
    seen = set(reader.get_all_records())
    if seen != records:
        raise Refusal("torch's zip reader and Python's see different members in it")
    if "archive_format" not in records or reader.get_record("archive_format") != b"pt2":
        raise Refusal("it is not a torch.export pt2 archive (its archive_format record is missing or not 'pt2')")
    models = sorted(r for r in records if r.startswith("models/"))
    for model in models:
        name = model[len("models/"):-len(".json")]
        _check_payloads(reader, records, name)
        _check_sample_inputs(reader, records, name)
        _check_program(_json(reader, model), model)


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path} looks like a zip archive (torch.export) but is damaged: {exc}; re-save "
                         "the model") from exc
    if len(set(names)) != len(names):
        raise Refusal("it holds two members of the same name")
    return names


def _root(names: list[str]) -> str:
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise Refusal("its members are not all in one top folder, as torch.export.save writes them")
    root = roots.pop()
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", root) or root in (".", ".."):
        raise Refusal(f"its top folder {root!r} is not a plain name")
    return root


def _torch_reader(path: Path) -> Any:
    import torch

    try:
        return torch._C.PyTorchFileReader(str(path))
    except Exception as exc:  # noqa: BLE001 - RuntimeError for any damage
        raise InputError(f"cannot load torch.export archive {path}: {str(exc).splitlines()[0].rstrip('.')}; "
                         "re-export the model") from exc


def _json(reader: Any, record: str) -> Any:
    try:
        return json.loads(reader.get_record(record))
    except (ValueError, RuntimeError) as exc:
        raise Refusal(f"its {record} is not readable JSON") from exc


def _check_payloads(reader: Any, records: set[str], name: str) -> None:
    for kind, folder, prefix in (("weights", "data/weights/", "weight_"), ("constants", "data/constants/", "tensor_")):
        config_name = f"{folder}{name}_{kind}_config.json"
        if config_name not in records:
            continue  # torch.export.load reports the missing record
        config = _json(reader, config_name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise Refusal(f"its {config_name} is not a payload config")
        for fqn, meta in entries.items():
            if not isinstance(meta, dict):
                raise Refusal(f"its {config_name} is not a payload config")
            path_name = str(meta.get("path_name"))
            if meta.get("use_pickle") or not path_name.startswith(prefix):
                what = "a pickled weight" if kind == "weights" else f"a pickled or opaque constant {path_name!r}"
                raise PickleRefusal(f"{what} in a torch.export archive")
            if not re.fullmatch(rf"{prefix}[0-9]+", path_name) or f"{folder}{path_name}" not in records:
                raise Refusal(f"its {kind} config names a record {path_name!r} that is not one of its raw tensors")
            if not isinstance(fqn, str) or not _FQN.match(fqn):
                raise Refusal(f"its {kind} config names {str(fqn)[:60]!r}, not a module attribute path")


def _check_sample_inputs(reader: Any, records: set[str], name: str) -> None:
    """The sample inputs become the forward's input paths, which torch pastes into generated code."""
    import torch

    record = f"data/sample_inputs/{name}.pt"
    if record not in records:
        return
    try:
        inputs = torch.load(io.BytesIO(reader.get_record(record)), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled code, or damage
        raise PickleRefusal("pickled sample inputs that are not plain tensors") from exc

    def plain(value: Any, depth: int = 0) -> bool:
        if depth > 20:
            return False
        if value is None or isinstance(value, (bool, int, float, torch.Tensor)):
            return True
        if type(value) in (tuple, list):
            return all(plain(item, depth + 1) for item in value)
        if type(value) is dict:
            return all(isinstance(k, str) and _IDENT.match(k) and plain(v, depth + 1) for k, v in value.items())
        return False

    if not plain(inputs):
        raise Refusal("its sample inputs are not tensors and numbers in tuples, lists and dicts with identifier "
                      "keys")


# ---------------------------------------------------------------------------------------------- the program
def _check_program(program: Any, record: str) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise Refusal(f"its {record} is not a serialized exported program")
    module = program["graph_module"]
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _plain_expression(guard, guard=True):
            raise Refusal(f"its guards_code {str(guard)[:60]!r} is Python code, not a shape check")
    for key, value in _walk(program):
        if key in _FORBIDDEN_KEYS and value is not None:
            raise Refusal(f"its graph takes {_FORBIDDEN_KEYS[key]}")
        if key == "expr_str" and not (isinstance(value, str) and _plain_expression(value)):
            raise Refusal(f"its symbolic expression {str(value)[:60]!r} is not plain arithmetic on shapes")
        if key == "nodes" and isinstance(value, list):
            for node in value:
                if isinstance(node, dict):
                    _check_target(node.get("target"))
                    _check_metadata(node.get("metadata"))
        if key == "forward_arg_names" and value is not None:
            if not isinstance(value, list) or not all(isinstance(n, str) and _IDENT.match(n) for n in value):
                raise Refusal("its forward_arg_names are not Python identifiers")
        if key in ("in_spec", "out_spec") and value is not None:
            _check_treespec(value)
        if key in ("parameter_name", "buffer_name", "tensor_constant_name") and not (
                isinstance(value, str) and _FQN.match(value)):
            raise Refusal(f"its graph names an attribute {str(value)[:60]!r}, not a module attribute path")
    graph = module.get("graph")
    if not isinstance(graph, dict) or graph.get("custom_obj_values"):
        raise Refusal("its graph holds custom objects")


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                yield key, child
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _check_target(target: Any) -> None:
    if not isinstance(target, str):
        raise Refusal("a node of its graph has no operator name")
    match = re.fullmatch(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)", target)
    if match:
        op, overload = match.groups()
        base = op[:-1] if op.endswith("_") and not op.endswith("__") else op
        if base in PURE_ATEN_OPS and overload != "out" and not overload.endswith("_out"):
            return
    elif target in PURE_PYTHON_TARGETS:
        return
    raise Refusal(f"its graph calls {target[:100]}, which is not on reluscope's list of pure tensor ops")


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        return
    source_fn = metadata.get("source_fn_stack")
    if isinstance(source_fn, str):
        for item in source_fn.split(";"):
            target = item.split(",", 1)[-1]
            if target.startswith("#"):
                raise Refusal(f"its graph metadata names an extension operator {target[:60]!r}")


def _check_treespec(spec: Any) -> None:
    try:
        data = json.loads(spec) if isinstance(spec, str) else None
    except ValueError:
        data = None
    if not isinstance(data, list) or len(data) != 2:
        raise Refusal("its input or output spec is not a pytree spec")

    def walk(node: Any, depth: int = 0) -> None:
        if depth > 50 or not isinstance(node, dict) or node.get("type") not in _SPEC_TYPES:
            kind = node.get("type") if isinstance(node, dict) else None
            raise Refusal(f"its inputs or outputs are a {str(kind)[:60]!r}, not tensors in tuples, lists and dicts")
        if node.get("type") in ("builtins.dict", "collections.OrderedDict"):
            try:
                keys = json.loads(node.get("context") or "[]")
            except (TypeError, ValueError):
                keys = None
            if not isinstance(keys, list) or not all(isinstance(k, str) and _IDENT.match(k) for k in keys):
                raise Refusal("its input or output dicts have keys that are not Python identifiers")
        for child in node.get("children_spec") or []:
            walk(child, depth + 1)

    walk(data[1])


def _plain_expression(text: str, *, guard: bool = False) -> bool:
    """Whether `text` is arithmetic and comparisons over shape symbols (sympy's srepr, or torch's
    guard syntax `L['x'].size()[0] == 3`), with nothing that could reach Python's builtins."""
    if len(text) > _MAX_EXPR or any(ord(c) < 32 or ord(c) > 126 for c in text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False

    def small(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= 64

    def has_pow(node: ast.AST) -> bool:
        return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow)
                   or isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _POW_CALLS
                   for n in ast.walk(node))

    def ok(node: ast.AST, depth: int = 0) -> bool:
        if depth > 60:
            return False
        deeper = depth + 1
        if isinstance(node, ast.Expression):
            return ok(node.body, deeper)
        if isinstance(node, ast.Constant):
            value = node.value
            if type(value) is int:
                return abs(value) <= _MAX_INT
            if type(value) in (bool, float) or value is None:
                return True
            return isinstance(value, str) and bool(_IDENT.match(value) or re.fullmatch(r"-?[0-9.e+\-]{1,40}", value))
        if isinstance(node, ast.Name):
            if guard and node.id in ("L", "math"):
                return True
            return node.id in _SYMPY_NAMES or (not guard and _IDENT.match(node.id) is not None
                                                and not node.id.startswith("_") and node.id not in _SYMPY_CALLS)
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)) and ok(node.operand, deeper)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return small(node.right) and not has_pow(node.left) and ok(node.left, deeper)
            return (isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod))
                    and ok(node.left, deeper) and ok(node.right, deeper))
        if isinstance(node, ast.BoolOp):
            return all(ok(v, deeper) for v in node.values)
        if isinstance(node, ast.Compare):
            return (all(isinstance(op, (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in node.ops)
                    and ok(node.left, deeper) and all(ok(c, deeper) for c in node.comparators))
        if isinstance(node, ast.Subscript):  # guards: L['x'], .size()[0]
            return guard and isinstance(node.slice, ast.Constant) and type(node.slice.value) in (str, int) \
                and ok(node.slice, deeper) and ok(node.value, deeper)
        if isinstance(node, ast.Attribute):  # guards: math.isnan, math.inf
            return guard and isinstance(node.value, ast.Name) and node.value.id == "math" \
                and node.attr in ("isnan", "isinf", "inf")
        if isinstance(node, ast.Call):
            func = node.func
            if guard and isinstance(func, ast.Attribute) and func.attr in _TENSOR_METHODS:
                return not node.args and not node.keywords and ok(func.value, deeper)
            if guard and isinstance(func, ast.Attribute):
                return ok(func, deeper) and not node.keywords and all(ok(a, deeper) for a in node.args)
            if not isinstance(func, ast.Name) or func.id not in _SYMPY_CALLS:
                return False
            if any(isinstance(a, ast.Starred) for a in node.args):
                return False
            if any(k.arg not in _SYMBOL_KWARGS or not isinstance(k.value, ast.Constant)
                   or type(k.value.value) not in (bool, int) or not ok(k.value, deeper) for k in node.keywords):
                return False
            if func.id in _POW_CALLS and (len(node.args) != 2 or not small(node.args[1]) and not _symbolic(node.args[1])
                                          or has_pow(node.args[0])):
                return False
            return all(ok(a, deeper) for a in node.args)
        return False

    return ok(tree)


def _symbolic(node: ast.AST) -> bool:
    """An exponent that sympy leaves unevaluated: a bare symbol."""
    return isinstance(node, ast.Name) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                                          and node.func.id == "Symbol")
