"""Package a trained work dir as a MONAI Model Zoo bundle folder, then run the zoo's checks on it offline.

    python -m scripts.package_zoo --work_dir runs/corpus_cpu64 --out dist/dino_diffusion_cxr \\
        --base_url https://example.org/releases/v0.4.0

The folder holds the configs, the bundle package, docs/README.md, LICENSE, configs/metadata.json with the data
formats of the trained networks, and models/ (model.pt: the diffusion UNet; model_autoencoder.pt; the DINO teacher),
listed with their SHA-256 in large_files.yml: upload models/* to --base_url and commit the folder without them.
Checks (bundle.zoo.verify): the files the zoo requires, version and changelog, metadata against the zoo schema
(a local copy of its rules), MONAI's verify_net_in_out on network_def, and a TorchScript export of the decoder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from bundle.zoo import package, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="the trained work dir (models/ with the generator)")
    parser.add_argument("--out", type=Path, required=True, help="the bundle folder to write (must not exist)")
    parser.add_argument("--base_url", required=True, help="where the weights files will be downloadable from")
    parser.add_argument("--version", help="the bundle version (needs a changelog entry in metadata.json)")
    parser.add_argument("--verify_only", action="store_true", help="only run the checks on --out")
    args = parser.parse_args()
    if not args.verify_only:
        package(args.work_dir, args.out, args.base_url, args.version)
    print(json.dumps(verify(args.out), indent=2))


if __name__ == "__main__":
    main()
