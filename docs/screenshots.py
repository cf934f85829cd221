"""Regenerate the HTML report screenshots in docs/ (shown in the README).

    PYTHONPATH=. .venv/bin/python docs/screenshots.py

Analyses the sample models and the training run in sample_models/run/ through the CLI, renders
the HTML pages and photographs them in headless Chromium (network blocked; see tests/browser.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import Browser, find_chromium, load_report_page  # noqa: E402

from reluscope.cli import app  # noqa: E402

SAMPLES = Path("sample_models")  # relative: the pages show the paths as a user would type them
DOCS = REPO / "docs"
os.chdir(REPO)
EPOCHS = ("00", "01", "03", "06", "12")


def run(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    if result.exit_code not in (0, 1):
        raise SystemExit(f"reluscope {' '.join(args)}: {result.output}")


def main() -> None:
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium is not installed")
    work = Path(tempfile.mkdtemp(prefix="reluscope-docs-"))
    calib = str(SAMPLES / "digits_calib.npz")
    arch = str(SAMPLES / "architectures.py")
    run("analyze", str(SAMPLES / "digits_cnn.pt"), "--arch", f"{arch}:digits_cnn", "--data", calib, "--gradients",
        "--percentiles", "-q", "-f", "json", "-o", str(work / "cnn.json"), "--html", str(work / "cnn.html"))
    run("analyze", str(SAMPLES / "digits_mlp_dead.pt"), "--arch", f"{arch}:digits_mlp", "--data", calib,
        "--gradients", "--percentiles", "--fail-on", "dead_fraction>0.05", "--fail-on", "act2:dead_units>40", "-q",
        "-f", "json", "-o", str(work / "mlp_dead.json"), "--html", str(work / "mlp_dead.html"))
    files = []
    for epoch in EPOCHS:
        files.append(str(work / f"epoch{epoch}.json"))
        run("analyze", str(SAMPLES / "run" / f"digits_mlp_epoch{epoch}.pt"), "--arch", f"{arch}:digits_mlp",
            "--data", calib, "--gradients", "--percentiles", "-q", "-f", "json", "-o", files[-1])
    labels = [a for e in EPOCHS for a in ("--label", f"epoch {int(e)}")]
    run("report", *files, "--html", str(work / "run.html"), "--title",
        "reluscope: digits MLP trained at lr 0.02, epochs 0-12", *labels, "-q")
    with Browser(chromium, width=1400, height=1000) as browser:
        for page, shots in (("cnn.html", {"html_digits_cnn.png": None}),
                            ("mlp_dead.html", {"html_digits_mlp_dead.png": None}),
                            ("run.html", {"html_training_run.png": ("#sequence", "#diff")})):
            state = load_report_page(browser, work / page)
            if state["error"] or browser.errors():
                raise SystemExit(f"{page}: {state['error'] or browser.errors()}")
            for name, sections in shots.items():
                if sections is None:
                    browser.screenshot(DOCS / name, full_page=True)
                else:
                    box = browser.evaluate(f"""(() => {{
                        const a = document.querySelector('{sections[0]}').getBoundingClientRect();
                        const b = document.querySelector('{sections[1]}').getBoundingClientRect();
                        return {{x: 0, y: a.top + window.scrollY, width: document.body.scrollWidth,
                                 height: b.bottom - a.top}};
                    }})()""")
                    browser.screenshot(DOCS / name, clip=box)
                print(f"wrote docs/{name} ({page}: charts drawn in {state['ms'] / 1000:.2f} s)")


if __name__ == "__main__":
    main()
