"""python -m mgssl.tools.predict RUN IMAGES_OR_FOLDER [--checkpoint best|last|ema] [--topk K] --out preds.csv

Class predictions of a trained run for image files: each image (one file, or every image below a
folder) preprocessed as the run's own evaluation did, classified in batches on the CPU or a GPU.
The CSV holds, per image, the top K class names with their probabilities; a file that cannot be
read gets a row with the reason and a line on stderr, and the other files are still predicted."""
import argparse
import csv
import sys
from pathlib import Path


def list_inputs(target: Path) -> tuple[list[str], list]:
    """(image files, skipped files with reasons) of a file or of a folder searched recursively."""
    from mgssl.pipelines.class_folders import Skipped, why_unusable, list_images

    if target.is_dir():
        skipped: list = []
        return list_images(target, skipped), skipped
    if not target.is_file():
        raise FileNotFoundError(f"{target} does not exist; pass an image file or a folder of images")
    reason = why_unusable(target)
    return ([str(target)], []) if reason is None else ([], [Skipped(str(target), reason)])


def predict(run_dir, target, *, checkpoint: str = "", topk: int = 1, device: str = "auto", batch_size: int = 64,
            warn=print) -> list[dict]:
    """One row per file: {"file", "class_1", "prob_1", ..., "error"} in the order the files were found."""
    import torch

    from mgssl.tools.inference import default_checkpoint, image_batches, load_model

    model = load_model(run_dir, checkpoint or default_checkpoint(run_dir), device)
    files, skipped = list_inputs(Path(target))
    if not files and not skipped:
        raise FileNotFoundError(f"{target} holds no files")
    k = max(1, min(topk, len(model.classes)))
    rows: dict[str, dict] = {}
    undecodable: set = set()
    device_of = next(model.net.parameters()).device
    with torch.no_grad():
        for names, x in image_batches(files, model.preprocess, batch_size=batch_size, device=device_of,
                                      undecodable=undecodable):
            probs = torch.softmax(model.net(x).float(), dim=1)
            top = probs.topk(k, dim=1)
            for name, p, i in zip(names, top.values.tolist(), top.indices.tolist()):
                row = {"file": name}
                for rank, (value, index) in enumerate(zip(p, i), start=1):
                    row[f"class_{rank}"], row[f"prob_{rank}"] = model.classes[index], round(value, 6)
                rows[name] = row
    failed = [(s.path, s.reason) for s in skipped]
    failed += [(f, "the image decoder cannot decode it") for f in sorted(undecodable)]
    for path, reason in failed:
        warn(f"warning: {path}: {reason}; no prediction")
    order = {f: i for i, f in enumerate(files)}
    out = [rows[f] for f in sorted(rows, key=order.get)]
    return out + [{"file": path, "error": reason} for path, reason in failed]


def write_csv(rows: list[dict], k: int, path: Path) -> None:
    columns = ["file"] + [c for r in range(1, k + 1) for c in (f"class_{r}", f"prob_{r}")] + ["error"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl predict", description=__doc__.split("\n\n")[1],
                                epilog="example:\n  python -m mgssl.tools.predict runs/flowers photos/ --topk 3 "
                                       "--out preds.csv", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the run folder (--out of python -m mgssl.train)")
    p.add_argument("images", type=Path, metavar="IMAGES_OR_FOLDER", help="an image file, or a folder searched "
                   "recursively")
    p.add_argument("--checkpoint", choices=("best", "last", "ema"), default="",
                   help="best: lowest validation error (the default when the run kept one); last: the end of "
                        "training (the default otherwise); ema: the weight average of train.ema")
    p.add_argument("--topk", type=int, default=1, help="classes per image, most probable first (default 1)")
    p.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: a GPU if there is one")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    args = p.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        print("error: --topk and --batch-size must be at least 1", file=sys.stderr)
        return 2
    warn = lambda text: print(text, file=sys.stderr)  # noqa: E731
    try:
        rows = predict(args.run, args.images, checkpoint=args.checkpoint, topk=args.topk, device=args.device,
                       batch_size=args.batch_size, warn=warn)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_csv(rows, args.topk, args.out)
    failed = sum(1 for r in rows if r.get("error"))
    print(f"{args.out}: {len(rows) - failed} images predicted" + (f", {failed} could not be read" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
