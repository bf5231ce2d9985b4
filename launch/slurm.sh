#!/bin/bash
# Train on several nodes with SLURM. Submit:  sbatch launch/slurm.sh configs/frcnn.yaml [key=value ...]
# SLURM sends SIGUSR1 120 s before the time limit; the trainer then saves a resumable state,
# writes RUN_DIR/PREEMPTED and exits; this script requeues the job, which resumes
# (train.resume=auto) exactly where it stopped.
#SBATCH --job-name=detector
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; accelerate starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

CONFIG=${1:?usage: sbatch launch/slurm.sh CONFIG [key=value ...]}
shift
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch/multi_node.yaml}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# PREEMPTED is this run's only: a requeued job that fails before the trainer clears it (a failed
# rendezvous, a bad node) must not requeue itself again on its earlier run's marker.
rm -f "$RUN_DIR/PREEMPTED"

# Every node runs one launcher; its machine rank is its SLURM node id. SLURM signals every
# process of the step: the launcher ignores SIGUSR1 (else it would die of it, and the step
# with it, while the training processes save), the training processes save and exit 75.
srun --kill-on-bad-exit=1 bash -c "trap '' USR1; exec accelerate launch \
  --config_file $LAUNCH_CONFIG \
  --num_machines $SLURM_NNODES \
  --num_processes $NUM_PROCESSES \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_ADDR \
  --main_process_port $MAIN_PORT \
  tools/train.py --config $CONFIG output_dir=$RUN_DIR train.resume=auto $*" &
SRUN_PID=$!

# Forward the early-warning signal to the training processes (srun relays it to the tasks).
trap 'kill -USR1 $SRUN_PID 2>/dev/null' USR1 TERM
wait $SRUN_PID
status=$?
while kill -0 $SRUN_PID 2>/dev/null; do wait $SRUN_PID; status=$?; done

if [ -f "$RUN_DIR/PREEMPTED" ]; then
  echo "preempted ($(cat "$RUN_DIR/PREEMPTED")); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $status
