# The payflow image: the API (gunicorn) and, with another command, the CLI.
FROM python:3.11-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY payflow ./payflow
COPY sql ./sql
COPY gunicorn.conf.py ./
RUN pip install --no-cache-dir -e . && useradd --system payflow
USER payflow
ENV PAYFLOW_HOST=0.0.0.0 PAYFLOW_PORT=8080
EXPOSE 8080
CMD ["payflow", "serve"]
