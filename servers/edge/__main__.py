from servers.common import lifecycle
from servers.edge.server import build

if __name__ == "__main__":
    lifecycle.run("edge", build)
