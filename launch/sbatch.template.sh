#!/bin/bash
# Written by qwen2-launch from launch/sbatch.template.sh. Resubmit (e.g. after editing) with: sbatch <this file>
@DIRECTIVES@
set -uo pipefail

# Identical on every node: the first host of the allocation and a port derived from the job id
# (a requeued job keeps its id, hence its port).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))
export MASTER_ADDR MASTER_PORT WORLD_SIZE=$SLURM_NTASKS
@EXPORTS@
restarts=${SLURM_RESTART_COUNT:-0}
say() { echo "[qwen2-launch $(date +%FT%T)] $*"; }
say "job $SLURM_JOB_ID start $restarts on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, $WORLD_SIZE ranks"

# USR1 (--signal=B:USR1@lead before the time limit, or scancel --signal=USR1 --batch) goes to
# the batch shell only: forward it through srun to every rank, which checkpoints and exits 0.
signalled=0
srun_pid=""
on_usr1() {
    signalled=1
    say "USR1: asking the trainer to checkpoint and exit"
    [ -z "$srun_pid" ] || kill -USR1 "$srun_pid"
}
on_term() { say "TERM (cancel or preemption): the ranks got it too and checkpoint"; }
trap on_usr1 USR1
trap on_term TERM

# RANK/LOCAL_RANK come from srun per task; everything else is the same on all ranks.
srun --kill-on-bad-exit=1 @SRUN_ARGS@ bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; exec "$@"' \
    rank @TRAIN_COMMAND@ &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal interrupts wait: wait again
    status=0
    wait "$srun_pid" || status=$?
done
say "trainer exited with status $status"

# Requeue after the signal whatever the exit status: a rank that had not yet installed its
# handler dies of USR1, and the job resumes from the last checkpoint there is.
if [ "$signalled" = 1 ]; then
    if grep -Eq '"step": @FINAL_STEP@[,}]' @METRICS@ 2>/dev/null; then
        say "the run reached its final step @FINAL_STEP@: not requeueing"
    elif [ "$restarts" -ge @MAX_REQUEUES@ ]; then
        say "not requeueing: $restarts restarts reached launcher.slurm.max_requeues=@MAX_REQUEUES@"
    else
        say "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
fi
exit "$status"
