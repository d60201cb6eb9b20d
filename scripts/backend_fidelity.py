"""Do the evaluation backends measure the same thing? Predictions of fake quantization and of the
int8 backend, compared image by image on the test split, for uniform and searched policies.

    python scripts/backend_fidelity.py [--model resnet18] [--dataset fashion-mnist] [--checkpoint PATH]
                                       [--policies 'studies/NAME/policies/*.json'] [--markdown FILE]

Both backends share one calibration (the same grids); each policy's predictions are taken from
the quantized model's logits. Agreement is the fraction of test images given the same class;
the accuracy difference is int8 minus fake, in percentage points.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import torch

from mpsearch import Evaluator, Policy, get_baseline, load_dataset
from mpsearch.config import QuantConfig
from mpsearch.host.machine import describe_machine

UNIFORM = ("w8a8", "w6a6", "w4a8", "w4a4")


def predictions(ev: Evaluator, policy: Policy, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and labels for ``policy`` on ``split``."""
    ev.apply(policy)
    predicted, labels = [], []
    with torch.inference_mode():
        for x, y in ev.data.split(split).subset(limit).batches(256):
            predicted.append(ev.qmodel.module(x.contiguous(memory_format=torch.channels_last)).argmax(dim=1))
            labels.append(y)
    return torch.cat(predicted), torch.cat(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--checkpoint", default=None, help="fp32 state dict (default: the cached baseline)")
    ap.add_argument("--policies", action="append", default=[], help="policy JSON files or a glob (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N images of the split (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    baseline = get_baseline(args.model, data, checkpoint=args.checkpoint)
    fake = Evaluator(baseline, data, quant=QuantConfig(backend="fake"), prefix_cache=False)
    fake.calibrate()
    int8 = Evaluator(baseline, data, quant=QuantConfig(backend="int8"), prefix_cache=False)
    int8.qmodel, int8._calibration_s = fake.qmodel, fake._calibration_s  # one calibration: the same grids

    files = sorted({f for pattern in args.policies for f in (glob.glob(pattern) or [pattern])})
    specs = [*UNIFORM, *files]
    rows = []
    for spec in specs:
        policy = fake.resolve_policy(spec)
        p_fake, labels = predictions(fake, policy, args.split, args.limit)
        p_int8, _ = predictions(int8, policy, args.split, args.limit)
        acc_fake = float((p_fake == labels).float().mean())
        acc_int8 = float((p_int8 == labels).float().mean())
        agree = float((p_fake == p_int8).float().mean())
        label = spec if spec in UNIFORM else f"{Path(spec).stem} ({policy.summary()})"
        rows.append((label, acc_fake, acc_int8, agree, int8.integer_layers))
        print(f"{label}: fake {100 * acc_fake:.2f} %, int8 {100 * acc_int8:.2f} %, agreement {100 * agree:.2f} %", flush=True)

    images = len(labels)
    source = Path(baseline.checkpoint).parent.name if baseline.checkpoint else "hub"
    lines = [
        f"{args.model} on {args.dataset}, {args.split} split ({images} images); baseline {source}; "
        f"fp32 accuracy {float(fake.fp32_mask(args.split, args.limit).float().mean()) * 100:.2f} %.",
        "",
        "| policy | fake accuracy | int8 accuracy | difference | same prediction | layers on int8 kernels |",
        "|---|---|---|---|---|---|",
        *[f"| {label} | {100 * a:.2f} % | {100 * b:.2f} % | {100 * (b - a):+.2f} pp | {100 * g:.2f} % | {k} of "
          f"{len(fake.layer_names)} |" for label, a, b, g, k in rows],
        "",
        f"- worst agreement {100 * min(r[3] for r in rows):.2f} %, largest accuracy difference "
        f"{100 * max(abs(r[2] - r[1]) for r in rows):.2f} pp over {len(rows)} policies",
        f"- measured by `python scripts/backend_fidelity.py --model {args.model}"
        + "".join(f" --policies '{p}'" for p in args.policies) + f"` on {describe_machine()}",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
