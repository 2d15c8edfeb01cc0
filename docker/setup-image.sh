#!/usr/bin/env bash
# The last step of building the training image, run inside it as root once
# the packages (docker/packages.txt), the CUDA libraries
# (docker/install-cuda.sh), the trainer and the configs are in place. Run by
# docker/build-image.sh (in a chroot) and docker/Dockerfile (RUN) alike.
set -euo pipefail

# ssh between the job's hosts, as root, without prompts: one key pair made
# here, so every container of this image trusts every other. Keep the image
# in a private registry (ECR): whoever has it holds the key.
mkdir -p /run/sshd /root/.ssh
rm -f /root/.ssh/id_ed25519 /root/.ssh/id_ed25519.pub
ssh-keygen -q -t ed25519 -N "" -C trainer-image -f /root/.ssh/id_ed25519
cp /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys
chmod 700 /root/.ssh
chmod 600 /root/.ssh/authorized_keys
printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' > /root/.ssh/config
sed -i 's/^#\?PermitRootLogin .*/PermitRootLogin prohibit-password/; s/^#\?StrictModes .*/StrictModes no/' /etc/ssh/sshd_config
grep -q '^PermitRootLogin prohibit-password' /etc/ssh/sshd_config

# The CUDA libraries through the loader's cache too (/etc/ld.so.conf.d/cuda.conf),
# not only LD_LIBRARY_PATH; then check what the trainer will look for.
ldconfig
test -f /usr/local/cuda/include/cuda_bf16.h
test -f /usr/local/cuda/lib64/libnvrtc.so.13
test -x /usr/local/bin/trainer
/usr/local/bin/trainer --version
