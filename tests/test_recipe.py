"""End-to-end smoke test: egs/librispeech_fl/run.sh stages 0-7 on a tiny embedded corpus."""
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import tiny_lm_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "egs/librispeech_fl"
LM_DECODE = "decode_asr_ctc_fusion_lm_lm_train_lm_rnn_valid.loss.best"  # asr.sh's name for a decoding with the LM


def test_every_phony_makefile_target_has_a_rule():
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    rules = set(re.findall(r"^([A-Za-z][\w.-]*):", makefile, re.M))
    assert phony and set(phony) <= rules, set(phony) - rules


def test_run_sh_help_lists_every_option_with_its_default():
    """`./run.sh --help` prints each option and its default, as ESPnet's asr.sh does."""
    script = (RECIPE / "run.sh").read_text()
    defaults = [(n, v.strip('"')) for n, v in re.findall(r'^([a-z_]+)=("[^"]*"|\S*)', script.split("help_message=", 1)[0], re.M)]
    proc = subprocess.run(["./run.sh", "--help"], cwd=RECIPE, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(defaults) > 20
    for name, value in defaults:
        line = re.search(rf"^  --{name} .*$", proc.stderr, re.M)
        assert line, name
        assert line.group(0).endswith(f'(default="{value}")'), line.group(0)


def test_run_sh_stages_0_to_7(tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    cmd = [
        "./run.sh", "--stage", "0", "--stop_stage", "7",
        "--corpus_config", "conf/corpus_tiny.yaml", "--min_utts", "1",
        "--data", str(data), "--exp", str(exp), "--tag", "smoke",
        "--fl_config", "conf/fl_dga.yaml", "--client_jobs", "1", "--nj", "1",
        "--fl_args", "rounds=2 clients_per_round=2 client.max_steps=2 client.max_duration=15",
        "--inference_model", "valid.acc.ave.pth",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=RECIPE, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in range(8):
        assert f"Stage {stage}:" in proc.stdout + proc.stderr
    # Stage 7: the decoded model, LM and decoding config in one zip, with ESPnet's meta.yaml.
    with zipfile.ZipFile(exp / "smoke/smoke_valid.acc.ave.zip") as packed:
        meta = yaml.safe_load(packed.read("meta.yaml"))
        assert meta["files"] == {"asr_model_file": "exp/asr/valid.acc.ave.pth", "lm_file": "exp/lm/valid.loss.best.pth"}
        assert yaml.safe_load(packed.read("decode.yaml")) == yaml.safe_load((RECIPE / "conf/decode_asr_ctc_fusion.yaml").read_text())
        assert {"data/token_list/bpe.model", "exp/asr_stats/feats_stats.npz", "exp/asr/RESULTS.md"} <= set(packed.namelist())
    assert (data / "corpus/LibriSpeech/SPEAKERS.TXT").exists()
    clients = (data / "clients/train-clean-100/clients.jsonl").read_text().splitlines()
    assert len(clients) == 4
    assert (exp / "asr_stats/feats_stats.npz").exists()
    rows = [json.loads(line) for line in (exp / "smoke/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    results = (exp / "smoke/RESULTS.md").read_text()
    for part in ("dev-clean", "test-clean", "test-other"):
        assert part in results
        score = json.loads((exp / f"smoke/{LM_DECODE}_valid.acc.ave/{part}/score.json").read_text())
        assert score["wer"]["counts"]["Snt"] > 0
        assert score["inference_config"]["lm_file"] == f"{exp}/lm_train_lm_rnn/valid.loss.best.pth"
    # Stage 4's LM was trained on the embedded corpus's LM text, every sentence of it.
    assert "Stage 4: ESPnet LM on" in proc.stdout
    lm_data = exp / "lm_train_lm_rnn/data"
    lm_lines = (lm_data / "train.txt").read_text().splitlines() + (lm_data / "valid.txt").read_text().splitlines()
    corpus_lm = (data / "corpus/LibriSpeech/librispeech-lm-norm.txt").read_text().splitlines()
    assert sorted(line.split(" ", 1)[1] for line in lm_lines) == sorted(corpus_lm) and len(corpus_lm) == 300
    assert "|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|" in results
    assert (exp / "smoke/images/dev_curve.png").exists()
    assert "federated training finished: 2 rounds" in (exp / "smoke/train.log").read_text()
    # Re-running finished stages is safe and quick (done markers / resume); --centralized true
    # adds the centralized reference, trained for the federated run's client CPU-seconds, and decodes both.
    # --use_lm false decodes with the acoustic model alone; RESULTS.md then tables both decodings.
    # (Only dev and test-other this time: each part decoded is a decoding process to start.)
    again = [*cmd[:-2], "--centralized", "true", "--inference_model", "valid.acc.best.pth", "--use_lm", "false",
             "--test_sets", "test-other"]
    again = subprocess.run(again, cwd=RECIPE, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Stage 5: centralized reference" in again.stdout + again.stderr
    central = exp / "centralized_train_asr_conformer_ctc"
    fl_cpu_seconds = sum(r["client_cpu_seconds"] for r in rows)
    budget = yaml.safe_load((central / "centralized_config.yaml").read_text())["budget_cpu_seconds"]
    assert budget == pytest.approx(fl_cpu_seconds)  # run.sh's wiring: --budget_from the federated exp dir
    spent = [json.loads(line)["train_cpu_seconds"] for line in (central / "metrics.jsonl").read_text().splitlines()]
    assert spent[-1] >= budget and (len(spent) < 2 or spent[-2] < budget)  # it stopped because the budget was spent
    for d in (exp / "smoke", central):
        assert "decode_asr_ctc_valid.acc.best/test-other" in (d / "RESULTS.md").read_text()
        with zipfile.ZipFile(d / f"{d.name}_valid.acc.best.zip") as packed:  # no LM in it
            assert yaml.safe_load(packed.read("meta.yaml"))["files"] == {"asr_model_file": "exp/asr/valid.acc.best.pth"}
    assert f"{LM_DECODE}_valid.acc.ave/test-other" in (exp / "smoke/RESULTS.md").read_text()


def test_corpus_dir_without_lm_text_trains_the_lm_on_the_clients_transcripts(tiny_corpus, tiny_clients, tmp_path):
    """asr.sh's default LM text is the training set's text: with --corpus_dir and no --lm_text,
    stage 4 writes the training clients' transcripts and the LM learns them (it used to stop at
    stage 0). A re-run leaves the text file as it is, so the LM is not trained again."""
    from fl_lib.asr.lm import write_client_transcripts
    from fl_lib.data.tokenizer import client_transcripts

    data, exp = tmp_path / "data", tmp_path / "exp"
    train_dir = data / "clients/train-clean-100"
    shutil.copytree(tiny_clients.parent, train_dir)  # stage 2's output: clients.jsonl, cuts/
    cmd = ["./run.sh", "--stage", "4", "--stop_stage", "4", "--corpus_dir", str(tiny_corpus),
           "--data", str(data), "--exp", str(exp), "--lm_config", str(tiny_lm_config(tmp_path))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=RECIPE, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = train_dir / "transcripts.txt"
    assert f"the LM learns the training clients' transcripts -> {text}" in proc.stdout
    assert f"Stage 4: ESPnet LM on {text}" in proc.stdout
    transcripts = sorted(client_transcripts(tiny_clients))
    assert sorted(text.read_text().splitlines()) == transcripts and len(transcripts) > 20
    lm_data = exp / "lm_lm/data"
    lm_lines = (lm_data / "train.txt").read_text().splitlines() + (lm_data / "valid.txt").read_text().splitlines()
    assert sorted(line.split(" ", 1)[1] for line in lm_lines) == transcripts
    assert (exp / "lm_lm/valid.loss.best.pth").is_file()
    written = text.stat().st_mtime_ns
    write_client_transcripts(train_dir / "clients.jsonl", text)  # what a re-run of stage 4 does first
    assert text.stat().st_mtime_ns == written
