"""Train the sample digits models and export them in every format reluscope reads.

Run from anywhere: ``python sample_models/train.py``. All outputs are written
next to this script; ``--checkpoints-only`` writes only the training run in run/.

What is reproducible: training uses fixed seeds, deterministic algorithms and
one thread, and the script runs itself with PYTHONHASHSEED=0 (TorchScript
writes a module's constants in set order, which string hashing would shuffle
per process). Re-running it on the same machine, with the same torch build, in
the same checkout gives the same bytes in every file. Elsewhere:

- the weights may differ in the last float32 bits (CPU kernels differ between
  instruction sets and torch builds; the committed files differ from a re-run
  here by up to 1e-5), while accuracies and dead-unit counts (manifest.json)
  stay the same;
- the ONNX, ``.pt2`` and TorchScript files record stack traces and source
  ranges naming the absolute paths of ``architectures.py`` and of torch's own
  modules, so a checkout or venv in another folder gives other bytes there.
"""

import contextlib
import io
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from architectures import DigitsMLP, digits_cnn, digits_mlp  # noqa: E402

N_CALIB = 360
BATCH = torch.export.Dim("batch", min=1, max=4096)


def load_data():
    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    # Fixed split: the last 360 samples (different writers) are held out.
    return x[:-N_CALIB], y[:-N_CALIB], x[-N_CALIB:], y[-N_CALIB:]


def fit(model, x, y, epochs, seed, lr=1e-3, batch=16):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def relu_outputs(model, x):
    """Outputs of every ReLU call, in forward order, plus the logits.

    Written out by hand because the CNN's functional F.relu has no module to
    hook and its nn.ReLU module is called twice.
    """
    if isinstance(model, DigitsMLP):
        a1 = model.act1(model.fc1(model.flatten(x)))
        a2 = model.act2(model.fc2(a1))
        return {"act1": a1, "act2": a2}, model.head(a2)
    r1 = model.relu(model.bn1(model.conv1(x)))
    r2 = F.relu(model.conv2(r1))
    r3 = model.relu(model.fc1(model.flatten(model.pool(r2))))
    return {"relu#0": r1, "relu()": r2, "relu#1": r3}, model.head(r3)


def dead_units(model, x):
    """Units (features, or channels for conv maps) that are never > 0 on x."""
    acts, logits = relu_outputs(model, x)
    assert torch.allclose(logits, model(x), atol=1e-5), "relu_outputs out of sync"
    out = {}
    for name, a in acts.items():
        per_unit_max = a.transpose(0, 1).flatten(1).amax(1)
        out[name] = {"dead": int((per_unit_max <= 0).sum()), "units": a.shape[1]}
    return out


@torch.no_grad()
def kill_units(model, x, quantiles):
    """Shift fc1/fc2 biases down by a quantile of each unit's max pre-activation
    on x, so that share of units starts dead (a bad init, a classic cause of
    dying ReLUs). Units dead on all training data get no gradient; fc2 units can
    revive as fc1 trains, hence its higher quantile."""
    h = model.flatten(x)
    for fc, q in zip((model.fc1, model.fc2), quantiles):
        fc.bias -= fc(h).amax(0).quantile(q)
        h = F.relu(fc(h))


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def export_all(model, name, example, x_check):
    files = {}
    model.eval()
    ref = lambda inp: model(inp).detach()  # noqa: E731

    path = HERE / f"{name}.pt"
    torch.save(model.state_dict(), path)
    files["state_dict"] = path.name

    path = HERE / f"{name}.torchscript"
    torch.jit.save(torch.jit.script(model), path)
    ts = torch.jit.load(path)
    assert torch.allclose(ts(x_check), ref(x_check), atol=1e-5)
    files["torchscript"] = path.name

    path = HERE / f"{name}.pt2"
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: BATCH}})
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    for n in (1, 7, N_CALIB):
        assert torch.allclose(loaded(x_check[:n]), ref(x_check[:n]), atol=1e-5)
    files["exported_program"] = path.name

    path = HERE / f"{name}.onnx"
    # The dynamo exporter reports progress via print and logging, and its
    # internal deepcopy of the program triggers torch's own pytree LeafSpec
    # FutureWarning (torch 2.13); neither is actionable here.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model, (example,), path, dynamo=True, external_data=False,
            dynamic_shapes={"x": {0: BATCH}}, input_names=["input"],
            output_names=["logits"], verbose=False,
        )
    check_onnx(path, ref, x_check)
    files["onnx"] = path.name
    return files


def check_onnx(path, ref, x_check):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, N_CALIB):
        (got,) = sess.run(["logits"], {"input": x_check[:n].numpy()})
        np.testing.assert_allclose(got, ref(x_check[:n]).numpy(), atol=1e-4, rtol=0)


# A training run whose units die: the MLP with a learning rate 20x the one above, saved as a
# state_dict at a few epochs (`reluscope report run/*.json --html` reads them as a sequence).
RUN_DIR = HERE / "run"
RUN_LR = 0.02
RUN_EPOCHS = (0, 1, 3, 6, 12)


def train_checkpoints():
    """Save digits_mlp at RUN_EPOCHS while fc1's units die (about 50 of 128 after one epoch, 74 after 12)."""
    x_train, y_train, x_cal, y_cal = load_data()
    RUN_DIR.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = digits_mlp()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=RUN_LR)
    run = {"architecture": "sample_models/architectures.py:digits_mlp", "learning_rate": RUN_LR,
           "calibration": "../digits_calib.npz", "checkpoints": []}
    for epoch in range(max(RUN_EPOCHS) + 1):
        if epoch:
            model.train()
            perm = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(x_train), 16):
                idx = perm[i : i + 16]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        if epoch in RUN_EPOCHS:
            model.eval()
            path = RUN_DIR / f"digits_mlp_epoch{epoch:02d}.pt"
            torch.save(model.state_dict(), path)
            dead = dead_units(model, x_cal)
            run["checkpoints"].append({"epoch": epoch, "file": path.name, "dead_units": dead,
                                       "test_accuracy": round(accuracy(model, x_cal, y_cal), 4)})
            print(f"run: epoch {epoch:2d}  dead: " + ", ".join(f"{k} {v['dead']}/{v['units']}" for k, v in dead.items()))
    (RUN_DIR / "manifest.json").write_text(json.dumps(run, indent=2) + "\n")


def main():
    start = time.perf_counter()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # avoids thread-count-dependent float reductions
    if "--checkpoints-only" in sys.argv[1:]:
        train_checkpoints()
        return
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    x_train, y_train, x_cal, y_cal = load_data()
    np.savez_compressed(HERE / "digits_calib.npz", x=x_cal.numpy(), y=y_cal.numpy())

    def mlp_dead():
        model = digits_mlp()
        kill_units(model, x_train, quantiles=(0.5, 0.9))
        return model

    specs = [  # name, factory, build, epochs, min accuracy
        ("digits_mlp", "digits_mlp", digits_mlp, 30, 0.9),
        ("digits_cnn", "digits_cnn", digits_cnn, 5, 0.9),
        ("digits_mlp_dead", "digits_mlp", mlp_dead, 40, 0.85),
    ]
    manifest = {"calibration": "digits_calib.npz", "input_shape": [None, 1, 8, 8],
                "dead_unit_definition": "never > 0 on the calibration set; "
                "a unit is a feature (2-D output) or a channel (4-D output)",
                "models": []}
    for name, factory, build, epochs, min_acc in specs:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = fit(build(), x_train, y_train, epochs, seed=0)
        train_s = time.perf_counter() - t0
        acc = accuracy(model, x_cal, y_cal)
        dead = dead_units(model, x_cal)
        assert acc > min_acc, f"{name}: accuracy {acc:.3f} too low"
        if name == "digits_mlp_dead":  # the point of this model: many dead units
            assert all(0.3 <= d["dead"] / d["units"] <= 0.8 for d in dead.values()), dead
        # clone: a view would make torch.export.save store the whole dataset storage
        files = export_all(model, name, x_cal[:2].clone(), x_cal)
        manifest["models"].append({
            "name": name,
            "architecture": f"sample_models/architectures.py:{factory}",
            "test_accuracy": round(acc, 4),
            "dead_units": dead,
            "files": files,
        })
        dead_txt = ", ".join(f"{k} {v['dead']}/{v['units']}" for k, v in dead.items())
        print(f"{name:16s} acc {acc:.3f}  dead: {dead_txt}  "
              f"(train {train_s:.1f}s, +export {time.perf_counter() - t0 - train_s:.1f}s)")

    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    train_checkpoints()
    print(f"wrote {len(specs)} models to {HERE} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # see the module docstring
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
