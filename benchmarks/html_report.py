"""Size and render time of the HTML report for a 100-site model.

    .venv/bin/python benchmarks/html_report.py [--sites 100] [--out /tmp/deep.html]

The model: 100 activation sites from torch layers, 50 Conv2d+BatchNorm2d+ReLU blocks (64, 128,
256, 512 channels in turn, on 8x8 maps) then 50 Linear+ReLU layers (256 and 512 features in turn);
random weights, some biases pushed down so that units die at a few depths. Analysed with
--gradients and --percentiles on 64 synthetic samples, then rendered with `render_html`; where
Chromium is installed the page is opened headless (network blocked) and the time until every chart
is drawn is measured in the page (performance.now at the end of drawing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import reluscope  # noqa: E402
from reluscope.present.html import render_html  # noqa: E402


def deep_model(sites: int) -> nn.Module:
    torch.manual_seed(0)
    convs, linears = sites // 2, sites - sites // 2
    layers: list[nn.Module] = [nn.Conv2d(1, 64, 3, padding=1)]
    channels = [64, 128, 256, 512]
    previous = 64
    for i in range(convs):
        out = channels[i % 4]
        if i:
            layers.append(nn.Conv2d(previous, out, 3, padding=1))
        bn = nn.BatchNorm2d(out)
        with torch.no_grad():
            bn.bias.normal_(0, 0.5)
            if i % 10 == 7:  # a few depths where units die
                bn.bias[: out // 3] = -30.0
        layers += [bn, nn.ReLU()]
        previous = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    features = [256, 512]
    for i in range(linears):
        out = features[i % 2]
        linear = nn.Linear(previous, out)
        with torch.no_grad():
            if i % 10 == 5:
                linear.bias[: out // 4] = -50.0
        layers += [linear, nn.ReLU()]
        previous = out
    layers.append(nn.Linear(previous, 10))
    return nn.Sequential(*layers).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "reluscope-deep.html")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = deep_model(args.sites)
    x = torch.randn(64, 1, 8, 8)
    t0 = time.perf_counter()
    report = reluscope.analyze(model, x, batch_size=32, gradients=True, percentiles=True, loss="half-squared-norm",
                               device="cpu").to_dict()
    analysed = time.perf_counter() - t0
    report_json = json.dumps(report, indent=2)
    t0 = time.perf_counter()
    page = render_html([report])
    rendered = time.perf_counter() - t0
    args.out.write_text(page, encoding="utf-8")
    units = sum(layer["units"] for layer in report["layers"])
    print(f"{len(report['layers'])} sites, {units} units; analysis {analysed:.1f} s")
    print(f"JSON report {len(report_json) / 1e6:.2f} MB; HTML page {len(page.encode()) / 1e6:.2f} MB "
          f"(rendered in Python in {rendered:.2f} s) -> {args.out}")
    from browser import Browser, find_chromium, load_report_page

    chromium = find_chromium()
    if chromium is None:
        print("chromium not found: no browser timing")
        return
    with Browser(chromium) as browser:
        state = load_report_page(browser, args.out, timeout=180)
        drawn = [c["name"] for c in state["charts"] if not c["empty"]]
        print(f"browser: charts drawn {state['ms'] / 1000:.2f} s after the script started "
              f"({state['wall_s']:.2f} s from navigation); {len(drawn)} charts; errors: {browser.errors() or 'none'}")


if __name__ == "__main__":
    main()
