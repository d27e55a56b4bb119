# fleetprobe: the probe, its testbed and the shipped scenarios.
#   docker build -t fleetprobe .
#   docker run --rm -p 9464:9464 fleetprobe                     # the demo
#   docker run --rm -v "$PWD:/work" -w /work fleetprobe run my-scenario.yaml
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 fleetprobe
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fleetprobe ./fleetprobe
COPY core ./core
COPY simulator ./simulator
COPY probes ./probes
COPY exporters ./exporters
COPY faults ./faults
COPY transport ./transport
COPY testbed ./testbed
COPY scenarios ./scenarios
RUN pip install --no-cache-dir . && rm -rf /src

USER fleetprobe
WORKDIR /home/fleetprobe
EXPOSE 9464
ENTRYPOINT ["fleetprobe"]
# In a container, /metrics must listen beyond loopback to be reachable through -p.
CMD ["demo", "--metrics-listen", "0.0.0.0:9464"]
