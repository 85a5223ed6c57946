"""Exporting and importing a session, against copying the same bytes with ``tar`` in the same run.

Builds a session holding ~230 MB of checkpoints (an MLP of 6.3M parameters with Adam: three
checkpoints of ~75 MB each, plus its per-sample tables), then alternates, for ``--rounds``
rounds: ``export_session`` vs ``tar cf`` of the session folder, and ``import_session`` vs
``tar xf`` of that tar into an empty folder. Both sides read warm files (the page cache holds the
session); ours also hashes every member (SHA-256), snapshots the database, fsyncs the archive
before renaming it into place, and on import checks sizes, checksums, the database and that the
checkpoints hold tensors only. Prints each round's times, the median ratios, and last the two
ratios on one line. Target: both <= 1.15. The first rounds can read high: the kernel is still
writing the freshly built session back to disk, and the export's fsync waits for it.

    .venv/bin/python benchmarks/sessions.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_session(home: Path) -> Path:
    os.environ["ONTHEFLY_HOME"] = str(home)
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import onthefly

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(2048, 1024)
    y = torch.randint(0, 10, (2048,))

    class Save(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            if run.epoch in (0, 1):
                run.save_checkpoint(reason="manual")

    summary = onthefly.quickstart(project="bench", run_name="big", model=model, optimizer=opt,
                                  loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(TensorDataset(x, y),
                                                                                        batch_size=256),
                                  max_epochs=3, callbacks=(Save(),), dashboard=False, progress=False)
    return summary.session_dir


def timed(fn: object, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="otf-bench-sessions-"))
    try:
        folder = build_session(scratch / "home")
        from onthefly.store.archive import export_session, import_session

        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        ckpt = sum(p.stat().st_size for p in (folder / "checkpoints").rglob("*") if p.is_file())
        print(f"session {folder.name}: {size / 1e6:.0f} MB ({ckpt / 1e6:.0f} MB of checkpoints)")
        archive, tarball = scratch / "s.otf", scratch / "s.tar"

        def tar_create() -> None:
            subprocess.run(["tar", "cf", str(tarball), "-C", str(folder.parent), folder.name], check=True)

        def tar_extract() -> None:
            target = scratch / "tar-out"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            subprocess.run(["tar", "xf", str(tarball), "-C", str(target)], check=True)

        def ours_import() -> None:
            home = scratch / "import-home"
            shutil.rmtree(home, ignore_errors=True)
            import_session(archive, home=home)

        exports, imports = [], []
        tar_create()
        export_session(folder, archive)  # warm both (the page cache, the imports)
        for i in range(args.rounds):
            ours, theirs = timed(export_session, folder, archive), timed(tar_create)
            exports.append(ours / theirs)
            ours_in, theirs_in = timed(ours_import), timed(tar_extract)
            imports.append(ours_in / theirs_in)
            print(f"round {i + 1}: export {ours:.3f} s vs tar cf {theirs:.3f} s ({exports[-1]:.2f}x); "
                  f"import {ours_in:.3f} s vs tar xf {theirs_in:.3f} s ({imports[-1]:.2f}x)")
        print(f"archive {archive.stat().st_size / 1e6:.0f} MB, tar {tarball.stat().st_size / 1e6:.0f} MB")
        print(f"median ratios: export {statistics.median(exports):.3f}, import {statistics.median(imports):.3f}")
        print(f"ratio: export {statistics.median(exports):.3f} import {statistics.median(imports):.3f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
