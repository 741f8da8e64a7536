/* The connection pool status page (django_pooled_pg): fetches the page's model from the JSON
   endpoint every few seconds and updates the page in place. Values are set with textContent
   (never innerHTML), so host names and application names stay text. No dependencies. */
"use strict";
(function () {
    const root = document.getElementById("dpp-status");
    if (!root) {
        return;
    }
    const url = root.dataset.jsonUrl;
    const every = parseInt(root.dataset.refreshMs, 10) || 3000;
    const chartEvery = parseInt(root.dataset.chartRefreshMs, 10) || 30000;
    const state = document.getElementById("dpp-state");
    let lastChart = Date.now();
    let busy = false;

    function get(object, path) {
        let value = object;
        for (const key of path.split(".")) {
            if (value === null || value === undefined) {
                return undefined;
            }
            value = value[key];
        }
        return value;
    }

    function text(value) {
        return value === null || value === undefined || value === "" ? "–" : String(value);
    }

    function fillRows(tbody, rows, columns) {
        const fresh = document.createDocumentFragment();
        for (const row of rows || []) {
            const tr = document.createElement("tr");
            if (row.stale) {
                tr.classList.add("dpp-stale");
            }
            if (row.saturated) {
                tr.classList.add("dpp-saturated");
            }
            if (row.key !== undefined) {
                tr.dataset.key = row.key;
            }
            for (const cell of (row.cells || row)) {
                const td = document.createElement("td");
                td.textContent = cell;
                tr.appendChild(td);
            }
            fresh.appendChild(tr);
        }
        if (!fresh.childNodes.length && tbody.dataset.rows === "processes") {
            const tr = document.createElement("tr");
            tr.className = "dpp-empty";
            const td = document.createElement("td");
            td.colSpan = columns;
            td.textContent = "No process publishes statistics for this alias.";
            tr.appendChild(td);
            fresh.appendChild(tr);
        }
        tbody.replaceChildren(fresh);
    }

    function renderAlias(section, model) {
        for (const el of section.querySelectorAll("[data-k]")) {
            const value = get(model, el.dataset.k);
            if (el.dataset.k.startsWith("chart.") && model.chart === undefined) {
                continue;
            }
            el.textContent = el.dataset.k.startsWith("capacity.") && value === undefined ? "" : text(value);
        }
        for (const tbody of section.querySelectorAll("[data-rows]")) {
            const columns = tbody.closest("table").querySelectorAll("thead th").length;
            fillRows(tbody, get(model, tbody.dataset.rows), columns);
        }
        for (const el of section.querySelectorAll("[data-w]")) {
            const width = Number(get(model, el.dataset.w));
            el.setAttribute("width", String(Number.isFinite(width) ? width : 0));
        }
        for (const el of section.querySelectorAll("[data-over]")) {
            el.classList.toggle("dpp-over", Boolean(get(model, el.dataset.over)));
        }
        if (model.chart !== undefined) {
            for (const el of section.querySelectorAll("[data-d]")) {
                const d = String(get(model, el.dataset.d) || "");
                // Path data only: numbers, spaces and the commands it uses.
                el.setAttribute("d", /^[MLh0-9 .\-]*$/.test(d) ? d : "");
            }
        }
    }

    function render(model) {
        for (const el of root.querySelectorAll(":scope > .dpp-meta [data-k]")) {
            el.textContent = text(get(model, el.dataset.k));
        }
        const list = root.querySelector("[data-list=messages]");
        const items = document.createDocumentFragment();
        for (const [kind, lines] of [["error", model.errors], ["warning", model.problems]]) {
            for (const line of lines || []) {
                const li = document.createElement("li");
                li.className = kind;
                li.textContent = line;
                items.appendChild(li);
            }
        }
        list.replaceChildren(items);

        const sections = new Map();
        for (const section of root.querySelectorAll("section[data-alias]")) {
            sections.set(section.dataset.alias, section);
        }
        const names = model.aliases.map((a) => a.alias);
        if (names.length !== sections.size || names.some((name) => !sections.has(name))) {
            window.location.reload(); // an alias appeared or went away: rare, rebuild the page
            return;
        }
        for (const alias of model.aliases) {
            renderAlias(sections.get(alias.alias), alias);
        }
    }

    function say(message, error) {
        state.textContent = message;
        state.classList.toggle("dpp-error", Boolean(error));
    }

    async function refresh() {
        if (busy || document.hidden) {
            return;
        }
        busy = true;
        const chart = Date.now() - lastChart >= chartEvery;
        try {
            const response = await fetch(url + (chart ? "?chart=1" : ""), {
                credentials: "same-origin",
                headers: {Accept: "application/json"},
                cache: "no-store",
            });
            const type = response.headers.get("Content-Type") || "";
            if (!type.startsWith("application/json")) {
                say("Signed out: reload the page to sign in again.", true);
                return;
            }
            const model = await response.json();
            if (!response.ok) {
                say(model.error || ("Refresh failed: HTTP " + response.status), true);
                return;
            }
            if (chart) {
                lastChart = Date.now();
            }
            render(model);
            // The server's clock and time zone, as in "Updated ..." (the browser's may differ).
            say("Refreshes every " + every / 1000 + " s; last at " + model.taken_at + ".", false);
            root.dataset.refreshed = String((parseInt(root.dataset.refreshed, 10) || 0) + 1);
        } catch (error) {
            say("Refresh failed: " + error.message, true);
        } finally {
            busy = false;
        }
    }

    window.setInterval(refresh, every);
    document.addEventListener("visibilitychange", () => {
        if (!document.hidden) {
            refresh();
        }
    });
})();
