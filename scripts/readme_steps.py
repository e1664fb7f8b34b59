"""Turns README sections into one shell script that runs their ```sh blocks in order, as a
reader would type them: servers started with `&` are waited for before the next line, the
default ports are replaced by free ones (the reader's machine is this one), and every
line must succeed. Used by scripts/readme-check.

usage: readme_steps.py README.md HUB_PORT GATEWAY_PORT NATS_PORT SECOND_HUB_PORT "Section title" ...
"""

import re
import sys


def sections(text, titles):
    """The ```sh blocks of each titled `## ` section (its `###` subsections included)."""
    out = []
    for title in titles:
        start = text.find("\n## " + title + "\n")
        if start < 0:
            sys.exit("readme_steps: no section %r" % title)
        end = text.find("\n## ", start + 1)
        body = text[start : end if end > 0 else len(text)]
        blocks = re.findall(r"```sh\n(.*?)```", body, re.S)
        if not blocks:
            sys.exit("readme_steps: section %r has no sh block" % title)
        out.append((title, blocks))
    return out


def main():
    readme, hub, gateway, nats, second_hub = sys.argv[1:6]
    titles = sys.argv[6:]
    text = open(readme, encoding="utf-8").read()
    ports = {"7700": hub, "7710": gateway, "4222": nats, "7701": second_hub}
    print("set -euo pipefail")
    # What the steps start in the background ends with them.
    # (the last started first: nodes say goodbye while NATS is still there)
    print("trap 'for p in $(jobs -p | tac); do kill $p 2>/dev/null || true; wait $p 2>/dev/null || true; done' EXIT")
    for title, blocks in sections(text, titles):
        print('echo "== README: %s" >&2' % title.replace('"', ""))
        for block in blocks:
            for line in block.splitlines():
                for old, new in ports.items():
                    line = line.replace("127.0.0.1:" + old, "127.0.0.1:" + new)
                # (a server line may start with environment settings: GOMEMLIMIT=1GiB nats-server …)
                starts_server = re.match(r"([A-Z_]+=\S+ )*nats-server ", line) is not None
                if starts_server:
                    line = line.replace("nats-server ", "nats-server -a 127.0.0.1 -p %s " % nats, 1)
                code = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
                if not code:
                    print(line)
                    continue
                print('echo "\\$ %s" >&2' % code.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`"))
                if code.startswith(("tessera swarm run", "tessera flow run")):
                    print("wait_nodes")
                print(line)
                if code.endswith("&"):
                    if "hub serve" in code:
                        print("wait_port %s" % (second_hub if "127.0.0.1:" + second_hub in line else hub))
                    elif "--listen" in code:
                        print("wait_port %s" % gateway)
                    elif starts_server:
                        print("wait_port %s" % nats)
    print('echo "== README: every step passed" >&2')


if __name__ == "__main__":
    main()
