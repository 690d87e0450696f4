"""Two short probes on a trained MNIST DDPM base, behind the choices in docs/ddpm.md:

- ``guidance``: how often the judges classify the base model's samples as their label, per guidance
  scale and DDIM step count (60 samples per digit);
- ``lambda``: 200 forgetting steps per EWC weight (EMA off), the loss terms every 50 steps, and how
  noise-like the forgotten class's samples become (fraction of mid-gray pixels; digits are mostly 0/255).

    python benchmarks/ddpm_probes.py guidance --base runs/ddpm_mnist/base
    python benchmarks/ddpm_probes.py lambda --base runs/ddpm_mnist/base \
        --fisher runs/ddpm_mnist/fisher.safetensors
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from selective_amnesia.config import load_config
from selective_amnesia.core.fisher import Fisher
from selective_amnesia.core.sampling import sample_per_label
from selective_amnesia.core.train import Loop, class_forgetting, forget, model_anchor
from selective_amnesia.evaluate.assess import for_classifier
from selective_amnesia.models import load_model
from selective_amnesia.pipeline.classes import load_classifiers, stage_replay

CONFIG = "configs/ddpm_mnist.yaml"


def guidance(base_dir: str) -> None:
    base = load_model(base_dir)
    classifiers, _ = load_classifiers(load_config(CONFIG, ["progress=false"]))
    for w, steps in [(1.0, 25), (1.25, 25), (1.5, 25), (2.0, 25), (3.0, 25), (4.0, 25), (2.0, 50)]:
        x, y = sample_per_label(base, list(range(10)), 60, 7, guidance_scale=w, num_inference_steps=steps)
        images = base.to_uint8(x)
        accs = [
            float((c.predict_proba(for_classifier(images, c)).argmax(1) == y).double().mean())
            for c in classifiers
        ]
        print(f"w={w} steps={steps}: correctly classified {[round(a, 3) for a in accs]}", flush=True)


def lambdas(base_dir: str, fisher_path: str, values: list[float], work: Path) -> None:
    base = load_model(base_dir)
    fisher = Fisher.load(fisher_path, base)
    total = sum(float(v.sum()) for v in fisher.values.values())
    count = sum(v.numel() for v in fisher.values.values())
    peak = max(float(v.max()) for v in fisher.values.values())
    print(f"Fisher: mean {total / count:.4g}, max {peak:.4g} per parameter")
    for lam in values:
        cfg = load_config(
            CONFIG,
            ["forget.steps=200", f"forget.ewc_lambda={lam}", "forget.ema_decay=0", "forget.log_every=50"],
        )
        replay = stage_replay(cfg, base, work)
        model = copy.deepcopy(base)
        concept, replay_source = class_forgetting(cfg.forget, model, list(range(10)), replay_set=replay)
        anchor = model_anchor(cfg.forget, fisher, model)
        history = forget(model, concept, replay_source, anchor, Loop(cfg.forget, 0), progress=False)
        x, _ = sample_per_label(model, [cfg.forget.forget_label], 16, 1, num_inference_steps=10)
        u = model.to_uint8(x).float()
        gray = float(((u > 60) & (u < 200)).float().mean())
        terms = {k: [round(v, 1) for v in vals] for k, vals in history.terms.items()}
        print(
            f"lambda {lam}: terms every 50 steps {terms}; mid-gray pixels in 0's samples {gray:.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=("guidance", "lambda"))
    ap.add_argument("--base", required=True)
    ap.add_argument("--fisher", default=None)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[10.0, 1.0, 0.1, 0.01])
    ap.add_argument("--work", type=Path, default=Path("runs/probe"), help="where the replay set is kept")
    args = ap.parse_args()
    if args.probe == "guidance":
        guidance(args.base)
    else:
        if not args.fisher:
            ap.error("the lambda probe needs --fisher")
        lambdas(args.base, args.fisher, args.lambdas, args.work)


if __name__ == "__main__":
    main()
