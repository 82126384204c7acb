#!/bin/sh
# OpenSSH calls this for the relay's "Token:" prompt (SSH_ASKPASS, SSH_ASKPASS_REQUIRE=force):
# the pipeline's short castgate token, never written to disk.
printf '%s\n' "$CASTGATE_TOKEN"
