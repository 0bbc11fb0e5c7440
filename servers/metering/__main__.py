from servers.common import lifecycle
from servers.metering.server import build

if __name__ == "__main__":
    lifecycle.run("metering", build)
