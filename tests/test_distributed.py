"""Process-group variables from the environment: torchrun's are used as they are, a plain srun task's derived."""

import pytest
import torch

from repro.distributed import (DEFAULT_TIMEOUT_S, TIMEOUT_ENV, PairwiseSum, collective_timeout_s, env_from_slurm,
                               first_host)


def test_srun_task_gets_torch_variables():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    assert env_from_slurm(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                                   "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_the_rendezvous_is_the_first_node_of_the_step_not_the_launch_node():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_STEP_NODELIST": "n[2-3]"}
    assert env_from_slurm(env)["MASTER_ADDR"] == "n2"  # srun from a login node: task 0 runs on n2
    assert env_from_slurm({**env, "MASTER_ADDR": "x"})["MASTER_ADDR"] == "x"


@pytest.mark.parametrize("nodelist,first", [("n1", "n1"), ("n[1-2]", "n1"), ("gpu[07-09,12],cpu1", "gpu07"),
                                            ("a,b", "a"), ("node-3", "node-3"), ("x[5,2]", "x5")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_torchrun_or_single_task_is_left_alone():
    assert env_from_slurm({"WORLD_SIZE": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == {}
    assert env_from_slurm({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    assert env_from_slurm({}) == {}


def test_missing_rendezvous_is_an_error():
    with pytest.raises(ValueError, match="rendezvous"):
        env_from_slurm({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"})


def test_pairwise_sum_of_aligned_blocks_is_the_sum_of_all_terms_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    terms = [torch.randn(1000, generator=g) * 10 ** float(i % 5) for i in range(16)]
    whole = PairwiseSum()
    for t in terms:
        whole.add(t)
    for block in (1, 2, 4, 8, 16):  # what each of 16 / block processes holds, then the tree over processes
        outer = PairwiseSum()
        for start in range(0, 16, block):
            inner = PairwiseSum()
            for t in terms[start:start + block]:
                inner.add(t)
            outer.add(inner.total())
        assert torch.equal(outer.total(), whole.total())
    left_to_right = sum(terms[1:], terms[0].clone())
    assert not torch.equal(left_to_right, whole.total())  # the order matters: why the tree is fixed
    three = PairwiseSum()
    for t in terms[:3]:
        three.add(t)
    with pytest.raises(ValueError, match="3 terms: not a power of two"):
        three.total()


def test_collective_timeout_from_the_environment():
    assert collective_timeout_s({}) == DEFAULT_TIMEOUT_S
    assert collective_timeout_s({TIMEOUT_ENV: "60"}) == 60
    for bad in ("soon", "0", "-5"):
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            collective_timeout_s({TIMEOUT_ENV: bad})
