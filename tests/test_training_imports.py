"""What a training process loads: only what training needs. A library loaded for a feature the
run never uses stays in the user's resident memory (scipy.stats 62 MiB, pandas 42 MiB, pulled in by
pyarrow's conveniences), so a whole run with validation and the autofork watcher loads neither."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from onthefly import quickstart
    x = torch.randn(1200, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    model = nn.Linear(8, 2)
    quickstart(project="imports", run_name="run", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
               val_loader=DataLoader(TensorDataset(x, y), batch_size=256), max_epochs=5, dashboard=False,
               progress=False)
    print(" ".join(sorted(name for name in ("pandas", "scipy", "sklearn", "duckdb", "pyarrow.compute", "rich")
                         if name in sys.modules)))
""")


def test_a_whole_run_loads_neither_pandas_nor_scipy(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ONTHEFLY_HOME": str(tmp_path / "home"), "ONTHEFLY_DASHBOARD": "0"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""  # the autofork watcher read 5 epochs' tables: still none loaded
    sessions = list((tmp_path / "home").rglob("epoch-00004-part-00000.parquet"))
    assert sessions, "the run recorded its last epoch"
