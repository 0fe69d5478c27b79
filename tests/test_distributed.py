"""Process-group variables from the environment: torchrun's are used as they are, a plain srun task's derived."""

import pytest

from repro.distributed import env_from_slurm


def test_srun_task_gets_torch_variables():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    assert env_from_slurm(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                                   "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_torchrun_or_single_task_is_left_alone():
    assert env_from_slurm({"WORLD_SIZE": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == {}
    assert env_from_slurm({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    assert env_from_slurm({}) == {}


def test_missing_rendezvous_is_an_error():
    with pytest.raises(ValueError, match="rendezvous"):
        env_from_slurm({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
