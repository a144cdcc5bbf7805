"""The bench scripts' parts that need no timing: GPU check on a machine without GPUs, HLO kernel counting,
profiler event classification, the medians of rounds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import speed  # noqa: E402
import step_kernels  # noqa: E402


@pytest.mark.e2e
def test_gpu_check_without_gpus_says_so_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no GPU" in lines[0], proc.stdout


HLO = """HloModule m, is_scheduled=true

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

%rng (state: u64[3]) -> (u64[3], u32[]) {
  %state = u64[3]{0} parameter(0)
  %a = u32[] fusion(%state), kind=kLoop, calls=%fused_computation
  %b = u64[3]{0} fusion(%state), kind=kLoop, calls=%fused_computation
  ROOT %t = (u64[3]{0}, u32[]) tuple(%b, %a)
}

%yes (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %f1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation
  ROOT %f2 = f32[4]{0} fusion(%f1), kind=kLoop, calls=%fused_computation
}

%no (p: f32[4]) -> f32[4] {
  ROOT %p = f32[4]{0} parameter(0)
}

ENTRY %main (a: f32[4], s: u64[3], c: pred[]) -> (f32[4], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %s = u64[3]{0} parameter(1)
  %c = pred[] parameter(2)
  %k = f32[] constant(1)
  %call = (u64[3]{0}, u32[]) call(%s), to_apply=%rng
  %conv = f32[4]{0} convolution(%a, %a), dim_labels=b0f_0io->b0f
  %cp = f32[4]{0} copy(%a)
  %cond = f32[4]{0} conditional(%c, %a, %a), true_computation=%yes, false_computation=%no
  %gte = u32[] get-tuple-element(%call), index=1
  ROOT %out = (f32[4]{0}, f32[4]{0}) tuple(%conv, %cond)
}
"""


def test_kernel_counts_of_an_hlo_module():
    computations, entry = step_kernels.hlo_computations(HLO)
    assert entry == "main"
    counts = step_kernels.kernel_counts(computations, entry)
    # the call's two fusions, the conv, the copy, the conditional and its larger branch's two fusions
    assert dict(counts) == {"fusion": 4, "convolution": 1, "copy": 1, "conditional": 1}


def test_profiler_events_executor_ops_and_xla_launches_only():
    assert step_kernels.classify("Call/cvae_1/mul:Mul") == ("Mul", "Call/cvae_1/mul")
    assert step_kernels.classify("CpuExecutable::ExecuteAsyncOnStream")[0] == step_kernels.XLA_LAUNCH
    for annotation in ("ThreadpoolListener::Record", "ThreadpoolListener::StartRegion",
                       "ThreadpoolListener::StopRegion", "ExecutorState::Process",
                       "ExecutorState::ProcessAsync::Start", "ExecutorState::ProcessAsync::Done",
                       "ThunkExecutor::Execute", "end: multiply_reduce_fusion.65", "multiply_reduce_fusion.65",
                       "EagerLocalExecute: __inference_train_step_14094", "KernelAndDeviceFunc::Run", "train_step"):
        assert step_kernels.classify(annotation) is None, annotation


def test_speeds_rounds_show_the_round_with_the_median_step_and_every_round_in_a_note():
    def record(step_s, ratio, finite=True):
        return {"code": "current", "config": "c", "variant": "float32", "step_s": step_s, "ratio": ratio,
                "images_per_s": 32 / step_s, "finite": finite, "note": "" if finite else "NON-FINITE LOSS"}

    rounds = [record(2.0, 0.9), {"error": "exit 1: killed"}, record(9.0, 0.5, finite=False), record(3.0, 0.8),
              record(4.0, 0.7)]
    merged = speed.median_record(rounds)
    assert merged["rounds"] == 4  # the failed round is left out
    # The lower median of 2, 3, 4, 9 s: that round's figures, together.
    assert (merged["step_s"], merged["ratio"], merged["images_per_s"]) == (3.0, 0.8, 32 / 3.0)
    assert merged["finite"] is False and merged["note"] == "NON-FINITE LOSS"  # a bad round shows
    assert merged["step_s_rounds"] == [2.0, 9.0, 3.0, 4.0] and merged["ratio_rounds"] == [0.9, 0.5, 0.8, 0.7]
    assert speed.per_round([merged]) == [
        "current c float32 by round: step s 2.000, 9.000, 3.000, 4.000; ratio 0.900, 0.500, 0.800, 0.700"]
    assert speed.median_record([rounds[1]]) == rounds[1]  # no round ran: its error
    single = speed.median_record(rounds[:1])
    assert single["step_s"] == 2.0 and speed.per_round([single]) == []  # one round: no per-round note


def test_speeds_conv_probes_together_are_the_models_training_convolutions():
    # bench/speed.py's "convs s" times each of the model's conv shapes alone, as many times as the model has
    # it: together they must be the step's convolutions (iaf_tf.flops' count), in the model's dtypes.
    import tensorflow as tf

    from iaf_tf.flops import training_flops_per_image
    from tests.fixtures import ONE_BLOCK_PER_LEVEL, make_model, random_images, run_model, seed, tiny_config

    batch = 2
    model = make_model(tiny_config(ONE_BLOCK_PER_LEVEL, "mixed_precision=true"))
    run_model(model, tf.constant(random_images(batch)), seed(0))
    shapes = speed.model_convs(model, batch)
    assert sum(shapes.values()) == len(model.named_convs())
    assert {shape[0] for shape in shapes} == {"float32", "bfloat16"}  # the outer convs, the blocks'
    assert sum(count for shape, count in shapes.items() if shape[-1]) == 2  # x_dec and the level's deconv
    # Each probe runs its step once when made: a shape that did not fit its conv would fail here.
    probes = [(speed.ConvProbe(*shape), count) for shape, count in shapes.items()]
    assert sum(probe.flops * count for probe, count in probes) == batch * training_flops_per_image(model)
