from servers.common.lifecycle import run
from servers.generation.server import build

run("generation", build)
