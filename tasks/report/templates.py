"""Jinja2 templates of the reports: one self-contained HTML file, no external resources.

Autoescape is on for every template: captions, cities, questions, answers and paths are data
and may hold markup.  The only unescaped values are data URIs and numbers made by the report.
"""

from __future__ import annotations

from jinja2 import DictLoader, Environment, select_autoescape

CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 color:#222;background:#f4f5f7}
header{background:#1f2d3d;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
main{padding:16px 24px;max-width:1400px}
.note{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px;border-radius:4px}
table.kv,table.grid{border-collapse:collapse;background:#fff;margin:8px 0}
table.kv td,table.grid td,table.grid th{border:1px solid #d8dbe0;padding:3px 8px;
 text-align:left;vertical-align:top}
table.grid th{background:#eef0f3}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.plots img{max-width:100%;background:#fff;border:1px solid #d8dbe0;margin:6px 0}
section.query,section.stage{background:#fff;border:1px solid #d8dbe0;border-radius:6px;
 padding:12px 16px;margin:14px 0}
section.query h2,section.stage h3{margin:0 0 6px;font-size:16px}
.meta{color:#555;font-size:12px}
.question{font-size:15px;font-weight:600;margin:4px 0}
.error{color:#a31515;font-weight:600}
.top{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.answer{flex:1;min-width:280px;background:#f7f9fc;border-left:4px solid #4477aa;
 padding:8px 12px;white-space:pre-wrap}
.answer a.cite{background:#4477aa;color:#fff;border-radius:3px;padding:0 3px;
 text-decoration:none}
.hits{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.card{width:180px;border:1px solid #d8dbe0;border-radius:4px;padding:6px;background:#fff;
 font-size:12px}
.card.cited{border:2px solid #4477aa}
.frame{position:relative;display:inline-block;line-height:0;max-width:100%}
.frame img{display:block;max-width:100%;height:auto}
.box{position:absolute;border:2px solid #ff2d55;box-shadow:0 0 0 1px #fff}
.missing{display:flex;align-items:center;justify-content:center;width:160px;min-height:90px;
 background:#ddd;color:#555;font-size:11px;text-align:center;padding:4px;line-height:1.2}
.scores td{padding:0 4px 0 0;border:0}
.caption{color:#444;max-height:4.2em;overflow:hidden}
.path{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all}
"""

_BASE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{{ title }}</title><style>""" + CSS + """</style></head>
<body><header><h1>{{ title }}</h1></header><main>
{% for n in notes %}<p class="note">{{ n }}</p>{% endfor %}
{% block body %}{% endblock %}
</main></body></html>
"""

_MACROS = """
{% macro frame(t, boxes, label) -%}
{% if t.uri %}<div class="frame"><img src="{{ t.uri }}" width="{{ t.width }}"
 height="{{ t.height }}" alt="{{ label }}">
{%- for b in boxes %}<div class="box" data-box="{{ b.key }}"
 style="left:{{ b.left }}%;top:{{ b.top }}%;width:{{ b.width }}%;height:{{ b.height }}%"></div>
{%- endfor %}</div>
{%- else %}<div class="missing">{{ label }}: {{ t.reason }}</div>{% endif %}
{%- endmacro %}
{% macro kv(rows) -%}
<table class="kv">{% for k, v in rows %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table>
{%- endmacro %}
"""

_RUN = """{% extends "base" %}{% import "macros" as m %}{% block body %}
<h2>Run summary</h2>
{{ m.kv(summary) }}
<div class="plots">{% for title, uri in plots %}<div><img src="{{ uri }}" alt="{{ title }}">
</div>{% endfor %}</div>
{% for q in queries %}
<section class="query" id="q{{ q.idx }}">
<h2>{{ q.idx }}. {{ q.query_id }}</h2>
<div class="meta">mode {{ q.mode or "–" }} · top_k {{ q.top_k or "–" }}{% if q.filter %} · filter
 <code>{{ q.filter }}</code>{% endif %}{% if q.ms %} · {{ q.ms }}{% endif %}</div>
{% if q.text %}<p class="question">{{ q.text }}</p>{% endif %}
{% if q.error %}<p class="error">{{ q.error_stage }} error: {{ q.error }}</p>{% endif %}
<div class="top">
{% if q.query_image %}<div><div class="meta">query image</div>
{{ m.frame(q.query_thumb, q.query_boxes, "query image") }}
<div class="path">{{ q.query_image }}</div></div>{% endif %}
<div class="answer">{% if q.answer is none %}<em>no answer ({{ q.generator or "no engine"
 }})</em>{% elif not q.answer.strip() %}<em>empty answer</em>{% else %}{{ q.answer_html
 }}{% endif %}{% if q.citations %}
<div class="meta">cites {{ q.citations }}</div>{% endif %}</div>
</div>
<div class="hits">{% for h in q.hits %}
<div class="card{% if h.cited %} cited{% endif %}" id="q{{ q.idx }}-hit{{ h.rank }}">
{{ m.frame(h.thumb, h.boxes, "hit " ~ h.rank) }}
<div><b>[{{ h.rank }}]</b> {{ h.city or "(no city)" }} · sim {{ h.similarity }}</div>
<table class="scores">{% for name, v in h.scores %}<tr><td>{{ name }}</td><td>{{ v }}</td>
</tr>{% endfor %}</table>
<div class="caption" title="{{ h.caption }}">{{ h.caption }}</div>
</div>{% else %}<p class="meta">no images retrieved</p>{% endfor %}</div>
</section>
{% endfor %}
{% endblock %}"""

_OVERVIEW = """{% extends "base" %}{% import "macros" as m %}{% block body %}
<h2>Summary</h2>
{{ m.kv(summary) }}
<div class="plots">{% for title, uri in plots %}<div><img src="{{ uri }}" alt="{{ title }}">
</div>{% endfor %}</div>
<h2>Images per city</h2>
<table class="grid"><tr><th>city</th><th>images</th></tr>{% for c, n in cities %}
<tr><td>{{ c or "(no city)" }}</td><td>{{ n }}</td></tr>{% endfor %}</table>
<h2>Rejects by stage</h2>
<table class="grid"><tr><th>stage</th><th>rejects</th></tr>{% for s in stages %}
<tr><td><a href="#stage-{{ s.stage }}">{{ s.stage }}</a></td><td>{{ s.rows }}</td></tr>
{% else %}<tr><td colspan="2">no rejects</td></tr>{% endfor %}</table>
{% for s in stages %}<section class="stage" id="stage-{{ s.stage }}">
<h3>{{ s.stage }}: {{ s.rows }} reject{{ "s" if s.rows != 1 }}{% if s.rows >
 s.examples|length %} ({{ s.examples|length }} examples){% endif %}</h3>
<div class="hits">{% for e in s.examples %}<div class="card">
{{ m.frame(e.thumb, [], "file") }}
<div class="error">{{ e.error }}</div><div class="path">{{ e.source_uri }}</div>
</div>{% endfor %}</div></section>{% endfor %}
{% endblock %}"""

ENV = Environment(
    loader=DictLoader({"base": _BASE, "macros": _MACROS, "run": _RUN, "overview": _OVERVIEW}),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True, lstrip_blocks=True,
)


def render(name: str, **context) -> str:
    return ENV.get_template(name).render(**context)
