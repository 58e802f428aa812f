import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Most --quick experiment runs (subprocesses) spend their time in XLA:CPU compiles of small programs, and
# LLVM's backend optimizations are most of each compile: without them a --quick run takes ~25% less CPU
# (mtlora_digits 29.3 -> 20.8 s, bench_adapters 51.5 -> 42.7 s, quickstart 52.1 -> 39.0 s). But they can
# change the last bits of results (FMA contraction etc.; tests/test_errors_optim.py's exact bfloat16 ==
# rounded float32 check fails without them), and compute-bound code runs slower (notebook 05: 63.7 ->
# 117.6 s). So THIS process (the pytest worker, where the unit tests run) initialises its XLA backend
# with the default flags first, and only then adds the flag to the environment that subprocesses inherit
# (experiment --quick runs, 8-device ES children; test_notebooks removes it again for the kernels).
# Set LRJAX_TEST_XLA_OPT=1 to give subprocesses the default optimizations too.
_O0 = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("LRJAX_TEST_CHILD_XLA_O0") == "1":     # inherited from the pytest controller process
    _flags = _flags.replace(_O0, "").strip()
os.environ["XLA_FLAGS"] = _flags
import jax  # noqa: E402

jax.devices()  # XLA reads XLA_FLAGS once per process, here
if os.environ.get("LRJAX_TEST_XLA_OPT") != "1" and _O0 not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " " + _O0).strip()
    os.environ["LRJAX_TEST_CHILD_XLA_O0"] = "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("lrjax", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("lrjax")


# The long tests (notebooks, experiment smoke runs, 8-device subprocesses) first, longest first, handed
# out one at a time (pytest_configure below) so both workers share them and end together instead of
# leaving one long test running alone on one core while the other idles.
_LONG = ("04_fields", "06_adapter", "05_separable", "test_bench_adapters_quick", "test_bench_pvd_quick",
         "10_compression", "test_bench_compress_quick", "test_quickstart_quick", "03_eggroll",
         "test_bench_optim_quick", "test_bench_adapter_speed_quick", "01_lora", "test_bench_lora_quick",
         "test_bench_attention_quick", "test_es_sharding.py", "02_galore", "test_bench_es_quick", "test_mqar_quick",
         "test_hybrid_stack", "08_low_rank", "test_sharded_training.py", "11_tracks4d", "09_pretraining",
         "test_tracks4d_quick", "test_kv_cache_quick", "test_es_int8_quick", "test_lama_keyword_quick",
         "test_drrl_rank_quick")


def _rank(item) -> int:
    for i, s in enumerate(_LONG):
        if s in item.nodeid:
            return i
    # then the long tests not named above (another experiment's --quick smoke run, a new notebook), then
    # tests marked slow, then the rest
    if "_quick" in item.name or item.nodeid.startswith("tests/test_notebooks.py"):
        return len(_LONG)
    return len(_LONG) + (1 if item.get_closest_marker("slow") else 2)


# The heaviest unit tests by two full runs of the default suite on 2 quiet cores (2026-11-30,
# `--durations`: 6.3-47 s each; the multi-device and multi-process tests and the bad-input tests are
# kept). With the first 77 marked the default run took 943 s; the last 15 (about 165 worker-seconds)
# were added after it. They are marked slow so that the default run fits in 15 minutes;
# the next step is to shrink their shapes and bring them back into the default run.
_SLOW_UNIT = frozenset({
    "tests/test_reparam.py::test_factored_equals_materialized_linen[pissa]",
    "tests/test_reparam.py::test_factored_equals_materialized_linen[rslora]",
    "tests/test_dlrmamba.py::test_bfloat16_inputs_float32_state",
    "tests/test_attention.py::test_float32_chunk_vs_recurrent[kda]",
    "tests/test_pvd.py::test_any_to_any[mlp]",
    "tests/test_attention_layer.py::test_kda_layer_prefill_decode_equals_full[gdn-2]",
    "tests/test_dlrmamba.py::test_full_rank_factorization_equals_dense",
    "tests/test_markboard.py::test_sign_is_base_plus_selected_deltas_and_resign_swaps",
    "tests/test_pvd.py::test_density_options_train[alpha-points]",
    "tests/test_attention.py::test_float64_very_strong_decay_exact_fallback",
    "tests/test_attention.py::test_prefill_then_decode_equals_one_pass",
    "tests/test_kvcache.py::test_full_rank_is_exact_attention_and_prefill_decode[bfloat16]",
    "tests/test_attention.py::test_float32_strong_decay_chunk64",
    "tests/test_attention.py::test_float32_whole_chunk_tier_edge",
    "tests/test_attention.py::test_float64_recurrent_chunk_numpy[kda]",
    "tests/test_attention.py::test_grad_chunk_finite_differences",
    "tests/test_attention_layer.py::test_hybrid_stack_3_to_1_decode_and_grad",
    "tests/test_attention_layer.py::test_kda_layer_padding_mask_equals_unpadded",
    "tests/test_attention_layer.py::test_kda_layer_prefill_decode_equals_full[kda-4]",
    "tests/test_bank.py::test_bank_equals_each_example_with_its_own_adapter[bfloat16]",
    "tests/test_bank.py::test_bank_equals_each_example_with_its_own_adapter[float32]",
    "tests/test_bank.py::test_grad_trains_each_slot_on_its_own_examples",
    "tests/test_bank.py::test_nnx_tokens_per_example_and_small_batch_tiles",
    "tests/test_bank.py::test_scanned_stack_gets_per_layer_slices",
    "tests/test_bottleneck.py::test_init_grad_bfloat16_and_refusals",
    "tests/test_compress.py::test_compress_rules_factored_path_and_report",
    "tests/test_compress_dsvq.py::test_lowrank_stage_and_dkm",
    "tests/test_conv_adapters.py::test_factored_equals_materialize[dora-f32]",
    "tests/test_conv_adapters.py::test_factored_equals_materialize[lora-f32]",
    "tests/test_dlrmamba.py::test_classifier_params_states_and_counts",
    "tests/test_dlrmamba.py::test_jit_vmap_grad",
    "tests/test_dlrmamba.py::test_module_low_rank_at_full_rank_equals_dense_module",
    "tests/test_dlrmamba.py::test_scan_and_associative_agree_values_and_grads",
    "tests/test_dlrmamba.py::test_ss2d_matches_numpy_block_and_rotation_equivariance",
    "tests/test_errors_fields.py::test_degenerate_inputs_give_no_nan",
    "tests/test_es.py::test_lowrank_forward_equals_materialized",
    "tests/test_es.py::test_normal_draw_is_jax_normal_unpartitioned",
    "tests/test_experiments.py::test_factored_equals_materialized[DoRA]",
    "tests/test_experiments.py::test_factored_equals_materialized[LoRA]",
    "tests/test_fields.py::test_interface_jit_vmap[cp]",
    "tests/test_fields.py::test_interface_jit_vmap[grid]",
    "tests/test_fields.py::test_interface_jit_vmap[hash]",
    "tests/test_fields.py::test_interface_jit_vmap[mlp]",
    "tests/test_fields.py::test_interface_jit_vmap[vm]",
    "tests/test_fields.py::test_tensor_fields_equal_dense_reconstruction[vm]",
    "tests/test_fields.py::test_view_dependent_and_encodings",
    "tests/test_fields_axes.py::test_5x6x7_scene_end_to_end",
    "tests/test_fields_axes.py::test_density_only_fields",
    "tests/test_fields_axes.py::test_noncubic_tensor_fields_equal_dense_reconstruction[vm]",
    "tests/test_fields_axes.py::test_noncubic_tensor_fields_equal_dense_reconstruction[vm_sigma]",
    "tests/test_fields_axes.py::test_noncubic_upsample_equals_trilinear_of_dense[cp]",
    "tests/test_fields_axes.py::test_noncubic_upsample_equals_trilinear_of_dense[vm]",
    "tests/test_fields_axes.py::test_per_mode_vm_ranks_count_params_and_layout",
    "tests/test_fields_plenoxels.py::test_sh_grid_as_pvd_student_and_teacher",
    "tests/test_fields_tensorf.py::test_regularizer_in_training_and_pvd",
    "tests/test_fields_tensorf.py::test_upsample_equals_trilinear_of_dense[cp]",
    "tests/test_fields_tensorf.py::test_upsample_equals_trilinear_of_dense[vm]",
    "tests/test_galore_layerwise.py::test_layerwise_equals_plain_galore_mlp_and_lower_compiled_memory",
    "tests/test_kvcache.py::test_mla_direct_and_absorbed_equal_reference_and_prefill_decode[float32]",
    "tests/test_lama.py::test_lama_module_jit_grad_vmap_dtypes",
    "tests/test_linalg.py::test_gram_svd_matches_float64_svd_with_the_same_signs",
    "tests/test_linalg.py::test_svd_matches_float64_and_signs_pinned",
    "tests/test_lora_ga.py::test_stacked_leaves_equal_per_slice_init_and_vmap[random]",
    "tests/test_losses.py::test_loss_matches_float64_transcription",
    "tests/test_lragent.py::test_vmap_over_agents_with_shared_cache_and_grad",
    "tests/test_markboard.py::test_bad_input",
    "tests/test_markboard.py::test_twenty_random_signatures_verify",
    "tests/test_mixture.py::test_mixture_layer_composes_base_router_experts[remix]",
    "tests/test_noble.py::test_char_transformer_at_init_equals_base",
    "tests/test_optim.py::test_randomized_refreshes_recover_exact_subspace",
    "tests/test_pvd.py::test_active_learning_pool_points_and_poses",
    "tests/test_pvd.py::test_any_to_any[hash]",
    "tests/test_pvd.py::test_any_to_any[vm]",
    "tests/test_pvd.py::test_density_options_train[alpha-floor]",
    "tests/test_pvd.py::test_density_options_train[log-points]",   # 40 training steps; a loss-falls check
    "tests/test_pvd.py::test_losses_fall_stage_by_stage",
    "tests/test_pvd.py::test_point_distill_active_and_errors",
    "tests/test_pvd.py::test_point_distill_exact_vm_to_grid_and_callable",
    "tests/test_render.py::test_scene_and_metrics",
    "tests/test_reparam.py::test_bfloat16[lora]",
    "tests/test_reparam.py::test_bfloat16[pissa]",
    "tests/test_reparam.py::test_factored_equals_materialized_linen[dora]",
    "tests/test_reparam.py::test_factored_equals_materialized_linen[lora]",
    "tests/test_reparam.py::test_pissa_reconstructs_and_merge_unmerge_roundtrip",
    "tests/test_sna.py::test_als_other_kinds_jit_and_adam",
    "tests/test_sna.py::test_als_recovers_rank_r_separable_target_float64",
    "tests/test_sna.py::test_categorical_and_field",
    "tests/test_sna.py::test_fit_rank_r_target_and_rank_deficit_bound",
    "tests/test_tracks4d.py::test_equivariance_rank_and_losses",
    "tests/test_window_vit.py::test_vit_lora_factored_equals_materialized_and_targets",
    "tests/test_window_vit.py::test_vit_pooling_and_window_locality",
})


def _long(item) -> bool:
    """The notebooks, the experiments' ``--quick`` smoke runs and ``_SLOW_UNIT``: about half of the
    suite's CPU time, so they are marked ``slow`` and left out of the default run (``pyproject.toml`` adds
    ``-m 'not slow'``), which has to fit in 15 minutes on 2 cores. ``pytest -n auto -m slow`` runs
    them; ``-m ''`` runs everything. The multi-device and multi-process tests are not long here:
    they stay in the default run."""
    return item.nodeid.startswith("tests/test_notebooks.py") or "_quick" in item.name or item.nodeid in _SLOW_UNIT


@pytest.hookimpl(tryfirst=True)   # before pytest's own -m deselection sees the markers
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if _long(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_rank)


def pytest_configure(config):
    # pytest-xdist's default `--dist load` first gives each worker a run of CONSECUTIVE tests (a quarter of
    # its share: ~900 here), so every long test sorted first above went to worker gw0, one after another,
    # while gw1 ran the short ones. One test at a time per send is longest-first greedy scheduling over
    # both workers; the extra messages cost ~ms per test. An explicit --maxschedchunk wins.
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1
