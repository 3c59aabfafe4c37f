"""checkpoint.py: files a user loads never run code; a damaged checkpoint is refused in one line."""

import json
import os

import pytest
import torch

import checkpoint
import train_image

FAST = ["--iterations", "1", "--group_size", "2", "--prompts_per_rank", "2", "--num_steps", "4"]


class _RunsCode:
    """Unpickling this calls os.system: what a malicious trainer_state.pt would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]])
def test_a_tampered_trainer_state_is_refused_without_running_it(lora, tmp_path):
    base = ["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST, *lora]
    train_image.main(base)
    ckpt = tmp_path / "checkpoint-000001"
    state = checkpoint.read_state(ckpt)  # what the project writes loads with weights_only=True
    assert state["iteration"] == 1 and state["optimizer"]["state"]
    marker = tmp_path / "code_ran"
    torch.save({"iteration": 1, "optimizer": _RunsCode(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(SystemExit, match="trainer_state.pt") as e:
        train_image.main([*base, "--iterations", "2", "--resume", "auto"])
    assert "\n" not in str(e.value) and not marker.exists()  # one line, nothing executed
    torch.load(ckpt / "trainer_state.pt", weights_only=False)  # control: the crafted file does run code unsafely
    assert marker.exists()


def test_a_broken_checkpoint_json_is_refused_in_one_line(tmp_path):
    base = ["--model", "tiny-flux", "--output_dir", str(tmp_path), *FAST]
    train_image.main(base)
    (tmp_path / "checkpoint-000001" / "checkpoint.json").write_text(json.dumps({"model": "tiny-flux"}))
    with pytest.raises(SystemExit, match="checkpoint.json"):
        train_image.main([*base, "--iterations", "2", "--resume", str(tmp_path / "checkpoint-000001")])
