// The test node's sandbox image program (built by tests/controlplane/ensure-tools.sh).
module high-templar.test/node/pause

go 1.26.0
