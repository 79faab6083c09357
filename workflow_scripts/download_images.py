"""Download the images of an SVO-Probes CSV into the cache (rule `download_svo_images`)."""

from notice.data.download import DOWNLOAD_COLUMNS, Settings, download_images
from notice.data.svo_probes import image_urls
from notice.files.tables import write_table
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    options = snakemake.params.download
    urls = image_urls(snakemake.input.csv, snakemake.params.max_rows)
    settings = Settings(
        timeout=options["timeout_s"],
        retries=options["retries"],
        backoff=options["backoff_s"],
        max_bytes=options["max_bytes"],
        max_image_pixels=options["max_image_pixels"],
    )
    log.info("%d distinct image URLs -> %s (%s)", len(urls), snakemake.params.cache_dir, settings)
    table = download_images(urls, snakemake.params.cache_dir, options["workers"], settings)
    failed = table[~table["ok"]]
    log.info("%d ok (%d from the cache), %d failed", table["ok"].sum(), table["cached"].sum(), len(failed))
    log.info(
        "failure reasons:\n%s",
        failed["reason"].str.replace(r"\d+(\.\d+)?s$", "Ns", regex=True).value_counts().to_string(),
    )
    write_table(table, snakemake.output.downloads, DOWNLOAD_COLUMNS)
