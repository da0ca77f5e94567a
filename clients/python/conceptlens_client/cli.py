"""`conceptlens-client`: list models, predict and explain images against a ConceptLens server.

    conceptlens-client models [--server host:port] [--json]
    conceptlens-client predict IMAGE... [--model M] [--top-k K] [--json]
    conceptlens-client explain IMAGE... [--model M] [--layers L1,L2] [--heatmap out.png] [--json]
    conceptlens-client probe IMAGE... [--attack pgd] [--eps E | --eps-range LO:HI] [--steps N] [--save-adv adv.png]

Errors print one line and exit 2 (bad arguments or a refused call) or 1 (server unreachable); a closed pipe
(`... | head`) exits 141 quietly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from PIL import Image

from .client import Client, ServiceError
from .heatmap import heatmap
from .pipes import quiet_closed_pipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conceptlens-client", description="Call a ConceptLens server: models, predictions, explanations, probes.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default="localhost:50051", help="host:port (default localhost:50051)")
    common.add_argument("--json", action="store_true", help="print the response as JSON")
    common.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default 60)")
    common.add_argument("--token-file", type=Path, help="file holding the bearer token")
    common.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate (enables TLS)")
    common.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    common.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("models", parents=[common], help="list served models")
    for name, text in (("predict", "classify images"), ("explain", "classify images and trace the units behind it")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
        p.add_argument("--model", default="", help=MODEL_HELP)
        p.add_argument("--version", type=int, default=0, help="model version (default: latest)")
        p.add_argument("--top-k", type=int, default=0, help="classes per image (default 5)")
        if name == "explain":
            p.add_argument("--layers", default="", help="comma-separated layers (default: the deepest)")
            p.add_argument("--units", type=int, default=0, help="top units per layer (default 5)")
            p.add_argument("--target", default="", help="class to explain (default: the top prediction)")
            p.add_argument("--depth", type=int, default=0, help="multi-layer link depth (default 1)")
            p.add_argument("--heatmap", type=Path, help="write top units' maps over the image to this PNG "
                           "(one file per image: out.png, out_1.png, ...)")
    p = sub.add_parser("probe", parents=[common], help="attack images: does the prediction flip, at what epsilon, "
                       "and which units take over")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--model", default="", help=MODEL_HELP)
    p.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    p.add_argument("--attack", default="pgd", choices=ATTACKS, help="attack kind (default pgd)")
    p.add_argument("--norm", default="linf", choices=("linf", "l2"), help="threat model (default linf)")
    p.add_argument("--eps", type=float, help="fixed budget in [0,1] pixel units (default 8/255 without --eps-range)")
    p.add_argument("--eps-range", type=_eps_range, metavar="LO:HI",
                   help="search each image's minimal flipping epsilon in [LO, HI], e.g. 0:0.1")
    p.add_argument("--tolerance", type=float, default=0.0, help="search tolerance (default 1/255)")
    p.add_argument("--steps", type=int, default=0, help="attack iterations, Square: queries (default per attack)")
    p.add_argument("--restarts", type=int, default=0, help="PGD random restarts (default 1)")
    p.add_argument("--step-size", type=float, default=0.0, help="step size (default: a fraction of epsilon)")
    p.add_argument("--target", default="", help="class to reach (targeted attack; default untargeted)")
    p.add_argument("--ensemble", default="", help="ghost-ensemble: comma-separated other served models to add")
    p.add_argument("--seed", type=int, help="seed of the attack's random draws (default 0)")
    p.add_argument("--layers", default="", help="comma-separated layers to compare (default: the deepest)")
    p.add_argument("--units", type=int, default=0, help="changed units per layer (default 5)")
    p.add_argument("--save-adv", type=Path, help="write the adversarial image to this PNG "
                   "(one file per image: adv.png, adv_1.png, ...)")
    return parser


ATTACKS = ("fgsm", "pgd", "mifgsm", "ghost-ensemble", "square")
MODEL_HELP = "model: NAME, models/NAME or models/NAME/versions/V (default: the only or first served model)"


def _eps_range(text: str) -> tuple[float, float]:
    """argparse type of --eps-range: "LO:HI" with 0 <= LO < HI."""
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI, e.g. 0:0.1, got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"needs 0 <= LO < HI, got {text!r}")
    return lo, hi


def _client(args: argparse.Namespace) -> Client:
    token = args.token_file.read_text().strip() if args.token_file else None
    ca = args.tls_ca.read_bytes() if args.tls_ca else None
    key = args.tls_key.read_bytes() if args.tls_key else None
    cert = args.tls_cert.read_bytes() if args.tls_cert else None
    return Client(args.server, token=token, root_certificates=ca, private_key=key, certificate_chain=cert,
                  timeout=args.timeout)


def _model(client: Client, name: str) -> str:
    if name:
        return name
    models = client.models()
    if not models:
        raise ServiceError("NOT_FOUND", "the server serves no models")
    return models[0].model


def _heatmap_path(base: Path, i: int) -> Path:
    return base if i == 0 else base.with_name(f"{base.stem}_{i}{base.suffix}")


def run(args: argparse.Namespace) -> int:
    for image in getattr(args, "images", []):
        if not image.is_file():
            raise FileNotFoundError(f"no such image: {image}")
    with _client(args) as client:
        if args.command == "models":
            models = client.models()
            if args.json:
                print(json.dumps([MessageToDict(m) for m in models], indent=1))
            for m in [] if args.json else models:
                layers = ", ".join(f"{layer.name}({layer.units})" for layer in m.layers)
                print(f"{m.model} v{m.version} {m.architecture} {len(m.classes)} classes; layers {layers}")
            return 0
        model = _model(client, args.model)
        if args.command == "predict":
            response = client.predict(args.images, model, version=args.version, top_k=args.top_k)
            if args.json:
                print(json.dumps(MessageToDict(response), indent=1))
                return 0
            for path, pred in zip(args.images, response.predictions, strict=True):
                best = ", ".join(f"{c.label} {c.probability:.2f}" for c in pred.classes)
                print(f"{path}: {best}")
            return 0
        layers = [s for s in args.layers.split(",") if s]
        if args.command == "probe":
            return _probe(client, model, args, layers)
        want_maps = args.heatmap is not None
        response = client.explain(args.images, model, version=args.version, top_k_classes=args.top_k,
                                  top_k_units=args.units, layers=layers, target_class=args.target,
                                  depth=args.depth, include_maps=want_maps)
        for i, (path, exp) in enumerate(zip(args.images, response.explanations, strict=True)):
            if want_maps:
                units = exp.trace.layers[-1].units
                heatmap(Image.open(path), units, exp.trace.summary, _heatmap_path(args.heatmap, i))
            if not args.json:
                flag = " [ADVERSARIAL?]" if exp.trace.adversarial else ""
                plaus = f" plausibility {exp.trace.plausibility:.2f}" if exp.trace.HasField("plausibility") else ""
                print(f"{path}: {exp.trace.summary}{plaus}; {_score_text(exp.trace)}{flag}")
        if args.json:
            print(json.dumps(MessageToDict(response), indent=1))
        return 0


def _score_text(trace) -> str:
    """The trace's adversarial score, or why there is none (a bundle exported without detector or co-occurrence)."""
    if not trace.HasField("adversarial_score"):
        return "no adversarial score (the model has no detector)"
    return f"adversarial score {trace.adversarial_score:.2f}"


def _probe(client: Client, model: str, args: argparse.Namespace, layers: list[str]) -> int:
    if args.eps is not None and args.eps_range is not None:
        raise ValueError("give --eps or --eps-range, not both")
    eps = 8 / 255 if args.eps is None and args.eps_range is None else (args.eps or 0.0)
    response = client.probe(
        args.images, model, version=args.version, attack=args.attack, norm=args.norm, epsilon=eps,
        epsilon_range=args.eps_range, tolerance=args.tolerance, steps=args.steps, restarts=args.restarts,
        step_size=args.step_size, target_class=args.target, ensemble_models=[s for s in args.ensemble.split(",") if s],
        seed=args.seed, layers=layers, top_k_units=args.units, return_adversarial=args.save_adv is not None)
    for i, (path, res) in enumerate(zip(args.images, response.results, strict=True)):
        if args.save_adv is not None:
            _heatmap_path(args.save_adv, i).write_bytes(res.adversarial_png)
        if args.json:
            continue
        clean, adv = res.clean_prediction.classes[0], res.adversarial_prediction.classes[0]
        if res.flipped:
            where = f" at eps {res.min_flip_epsilon:.4f}" if res.HasField("min_flip_epsilon") else ""
            head = f"FLIPPED {clean.label} -> {adv.label}{where}"
        else:
            head = f"held {clean.label}"
        plaus = [t.plausibility for t in (res.clean_trace, res.adversarial_trace) if t.HasField("plausibility")]
        plaus_text = f"; plausibility {plaus[0]:.2f} -> {plaus[1]:.2f}" if len(plaus) == 2 else ""
        flagged = " [ADVERSARIAL?]" if res.adversarial_trace.adversarial else ""
        if res.clean_trace.HasField("adversarial_score") and res.adversarial_trace.HasField("adversarial_score"):
            plaus_text += (f"; adversarial score {res.clean_trace.adversarial_score:.2f} -> "
                           f"{res.adversarial_trace.adversarial_score:.2f}")
        else:
            plaus_text += "; no adversarial score (the model has no detector)"
        plaus_text += flagged
        units = ", ".join(f"{u.layer}#{u.unit}{' ' + u.concept if u.concept else ''} "
                          f"{u.clean_delta:+.3f}->{u.adversarial_delta:+.3f}" for u in res.changed_units[:3])
        print(f"{path}: {head} (confidence drop {res.confidence_drop:.2f}){plaus_text}; changed: {units}")
    if args.json:
        print(json.dumps(MessageToDict(response), indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_closed_pipe(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:  # `| head` closed stdout: quiet_closed_pipe ends the command without a message
        raise
    except ServiceError as err:
        print(f"conceptlens-client {args.command}: error: {err}", file=sys.stderr)
        return 1 if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else 2
    except (OSError, ValueError, TypeError) as err:
        print(f"conceptlens-client {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
