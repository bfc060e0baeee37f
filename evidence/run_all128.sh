#!/usr/bin/env bash
# Every 128-px result on two CPU cores, as two lanes of one thread each (each resumes where it stopped: run the same
# command again after an interruption; a finished stage is skipped):
#   generator lane  evidence/run_quality_cpu.sh cpu128 up to its guidance stage (DINO, autoencoder, latent cache, 60
#                   diffusion epochs, the guidance scale and sampler steps chosen on validation films), then the
#                   augmentation grid (evidence/run_augmentation128.sh) with that generator
#   heads lane      evidence/run_heads128.sh: the denoiser's pre-training, the tune stage for the initialisation whose
#                   learning rate was never chosen on validation films (TUNE_INITS, default the DINO ViT, at TUNE_LRS
#                   1e-3, 1e-4 and 3e-3; the denoiser and scratch keep the configured recipe, the first tune pass's choice),
#                   the heads grid, the zero-shot sweep and the report; its latent-UNet runs and zero-shot sweep wait
#                   for the generator lane's diffusion model; then it joins the augmentation grid (once the guidance
#                   stage has chosen its settings), taking the tasks the generator lane is not on
# Logs: runs/generator_lane.log and runs/heads_lane.log (each stage also keeps its own log in its work folder); the
# grids' rows are written into docs/results as they finish (docs/results/heads128, docs/results/augmentation128).
#   bash evidence/run_all128.sh                  (both lanes, in the background; returns at once)
#   LANES=heads bash evidence/run_all128.sh      (one lane)
# Settings: THREADS per lane (default 1), DIFFUSION_EPOCHS (default 60); the scripts' own settings pass through.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
export THREADS=${THREADS:-1}
for lane in ${LANES:-generator heads}; do
  case $lane in
    generator) nohup bash -c 'STAGES="train_dino train_autoencoder cache train_diffusion guidance" \
                 DIFFUSION_EPOCHS=${DIFFUSION_EPOCHS:-60} bash evidence/run_quality_cpu.sh cpu128 \
                 && bash evidence/run_augmentation128.sh' >> runs/generator_lane.log 2>&1 &;;
    heads) WAIT_GENERATOR=1 STAGES="pretrain tune grid zero_shot report" TUNE_INITS=${TUNE_INITS:-dino} \
             TUNE_LRS=${TUNE_LRS:-"0.001 0.0001 0.003"} nohup bash -c 'bash evidence/run_heads128.sh \
             && WAIT_GUIDANCE=1 bash evidence/run_augmentation128.sh' >> runs/heads_lane.log 2>&1 &;;
    *) echo "unknown lane $lane (generator, heads)"; exit 1;;
  esac
  echo "$lane lane started (pid $!): runs/${lane}_lane.log"
done
exit
}
