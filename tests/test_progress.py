"""Per-epoch progress parsed from nnU-Net's console output (medmamba demo streams it while training)."""
import io
import json

from medmamba.nnunet.progress import EpochProgress

LOG = """\
2026-01-01 10:00:00.000000: medmamba: {'trainer': 'nnUNetTrainerUMamba_demo', 'epochs': 4, 'iterations_per_epoch': 10}
2026-01-01 10:00:01.000000: 
2026-01-01 10:00:01.000000: Epoch 0
2026-01-01 10:00:01.000000: Current learning rate: 0.01
2026-01-01 10:00:30.000000: train_loss 0.1234
2026-01-01 10:00:30.000000: val_loss -0.05
2026-01-01 10:00:30.000000: Pseudo dice [np.float32(0.4321), np.float32(0.5)]
2026-01-01 10:00:30.000000: Epoch time: 30.0 s
2026-01-01 10:00:30.000000: Yayy! New best EMA pseudo Dice: 0.4321
2026-01-01 10:00:31.000000: Epoch 1
2026-01-01 10:00:50.000000: train_loss -0.2
2026-01-01 10:00:50.000000: val_loss -0.3
2026-01-01 10:00:50.000000: Pseudo dice [0.6]
2026-01-01 10:00:50.000000: Epoch time: 10.0 s
2026-01-01 10:00:51.000000: Training done.
"""


def test_epoch_lines_text_and_json():
    out = io.StringIO()
    prog = EpochProgress(stream=out)
    for line in LOG.splitlines(keepends=True):
        prog(line)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "final validation" in lines[2]
    assert "epoch 1/4" in lines[0] and "loss 0.1234" in lines[0] and "pseudo-Dice 0.432, 0.500" in lines[0]
    assert "ETA 1m30s" in lines[0]           # 3 epochs left x 30 s
    assert "ETA 0m40s" in lines[1]           # 2 left x mean(30, 10)
    assert prog.epochs[1]["pseudo_dice"] == [0.6]

    out = io.StringIO()  # compare --no-fold-validation: nnU-Net still prints "Training done."
    prog = EpochProgress(stream=out, final_validation=False)
    for line in LOG.splitlines():
        prog(line)
    assert len(out.getvalue().splitlines()) == 2 and "final validation" not in out.getvalue()

    out = io.StringIO()
    prog = EpochProgress(stream=out, json_lines=True)
    for line in LOG.splitlines():
        prog(line)
    rows = [json.loads(l) for l in out.getvalue().splitlines()]
    assert rows[0]["epoch"] == 0 and rows[0]["val_loss"] == -0.05 and rows[0]["eta_seconds"] == 90.0
