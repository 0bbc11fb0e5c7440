"""`python -m servers.retrieval`: runs the retrieval server until SIGTERM/SIGINT."""

from servers.common import lifecycle
from servers.retrieval.server import build


def main() -> None:
    lifecycle.run("retrieval", build)


if __name__ == "__main__":
    main()
