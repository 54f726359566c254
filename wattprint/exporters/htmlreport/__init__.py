"""Parts of the HTML report (:mod:`wattprint.exporters.report_html`): the plots, one module per kind,
and the page around them."""
