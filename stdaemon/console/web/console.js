/* stdaemon console: plain JavaScript, no dependencies, no build step.
 *
 * Talks to the daemon's JSON API with the session cookie set by
 * POST /api/auth/login; every state-changing call carries X-CSRF-Token (the
 * st_csrf cookie).  Data from the API is inserted with textContent only.
 */
(function () {
  "use strict";

  var SSL_WARNING = "Disabling SSL verification is a security risk. Only do this if you have a " +
    "self-signed certificate or are behind a corporate proxy. Continue?";
  var SSL_ACK_KEY = "stdaemon.sslVerificationWarningAccepted";
  var ROLE_RANK = { viewer: 1, operator: 2, admin: 3 };
  var TERMINAL = { completed: 1, failed: 1, cancelled: 1 };
  var METRIC_CATEGORIES = ["jobs", "http", "rate_limits", "approvals", "audit", "health",
    "circuit_breakers", "provider"];
  var PROVIDER_FIELDS = {
    ssl_verify: { kind: "bool", label: "SSL Verification" },
    ssl_ca_bundle: { kind: "text", label: "CA Bundle Path" },
    proxy_url: { kind: "text", label: "Proxy URL" },
    http_timeout: { kind: "number", label: "HTTP Timeout" },
    webhook_allowed_ips: { kind: "lines", label: "Webhook Security" },
    webhook_require_signature: { kind: "bool", label: "Require webhook signature" },
    s3_public_url: { kind: "text", label: "Public URL" },
    s3_endpoint_enabled: { kind: "bool", label: "S3 Endpoint Enabled" },
    s3_output_path: { kind: "text", label: "S3 Output Path" }
  };

  var state = { me: null, provider: null, providerConfig: {}, events: null, refreshTimer: null,
    metrics: null, activeJobs: [] };

  function $(id) { return document.getElementById(id); }

  function role() { return state.me ? (ROLE_RANK[state.me.role] || 0) : 0; }

  function csrfToken() {
    var parts = document.cookie ? document.cookie.split(";") : [];
    for (var i = 0; i < parts.length; i++) {
      var item = parts[i].trim();
      if (item.indexOf("st_csrf=") === 0) { return decodeURIComponent(item.slice(8)); }
    }
    return "";
  }

  function api(method, path, body) {
    var headers = { "Accept": "application/json" };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; }
    if (method !== "GET" && method !== "HEAD") {
      var token = csrfToken();
      if (token) { headers["X-CSRF-Token"] = token; }
    }
    return fetch(path, {
      method: method, headers: headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (response) {
      return response.text().then(function (text) {
        var data = null;
        if (text) {
          try { data = JSON.parse(text); } catch (e) { data = text; }
        }
        if (response.status === 401 && path !== "/api/auth/login" && state.me) {
          state.me = null;
          showLogin("Your session ended. Please sign in again.");
        }
        return { ok: response.ok, status: response.status, data: data };
      });
    }, function () {
      return { ok: false, status: 0, data: { error: "network", detail: "The daemon could not be reached." } };
    });
  }

  function detail(result) {
    if (result.data && typeof result.data === "object" && result.data.detail) { return result.data.detail; }
    return "Request failed (HTTP " + result.status + ")";
  }

  function flash(message) { $("flash").textContent = message || ""; }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function cell(row, text, className) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (className) { td.className = className; }
    row.appendChild(td);
    return td;
  }

  function fmtBytes(n) {
    if (!n) { return "0 B"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function fmtTime(value) {
    if (!value) { return ""; }
    var date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    return isNaN(date.getTime()) ? String(value) : date.toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  // -- field errors (next to the field, announced) -------------------------------------

  function setFieldError(field, message) {
    var input = $(field);
    var error = $(field + "-error");
    if (input) { input.setAttribute("aria-invalid", "true"); }
    if (error) {
      error.textContent = message;
      error.setAttribute("role", "alert");
    } else {
      flash(message);
    }
  }

  function clearFieldError(field) {
    var input = $(field);
    var error = $(field + "-error");
    if (input) { input.removeAttribute("aria-invalid"); }
    if (error) { error.textContent = ""; error.removeAttribute("role"); }
  }

  // -- views and routing -----------------------------------------------------------------

  var VIEWS = ["login", "jobs", "cloud", "admin", "health", "setup"];

  function showView(name) {
    VIEWS.forEach(function (view) { $("view-" + view).hidden = view !== name; });
    var links = document.querySelectorAll("[data-tab]");
    for (var i = 0; i < links.length; i++) {
      if (links[i].getAttribute("data-tab") === name) { links[i].setAttribute("aria-current", "page"); }
      else { links[i].removeAttribute("aria-current"); }
    }
  }

  function markSubtab(container, name) {
    var links = $(container).querySelectorAll("[data-subtab]");
    for (var i = 0; i < links.length; i++) {
      if (links[i].getAttribute("data-subtab") === name) { links[i].setAttribute("aria-current", "page"); }
      else { links[i].removeAttribute("aria-current"); }
    }
  }

  function route() {
    if (!state.me) { showLogin(); return; }
    var hash = (location.hash || "#jobs").slice(1);
    var parts = hash.split("/");
    var top = parts[0] || "jobs";
    if (VIEWS.indexOf(top) < 1 || top === "setup") { top = "jobs"; }
    showView(top);
    flash("");
    if (top === "jobs") { loadJobs(); }
    else if (top === "cloud") { markSubtab("view-cloud", "advanced"); loadProviders(); }
    else if (top === "admin") {
      var sub = parts[1] === "users" ? "users" : "metrics";
      markSubtab("view-admin", sub);
      $("admin-metrics").hidden = sub !== "metrics";
      $("admin-users").hidden = sub !== "users";
      if (role() < ROLE_RANK.admin) {
        $("admin-denied").hidden = false;
        $("admin-metrics").hidden = true;
        $("admin-users").hidden = true;
        return;
      }
      $("admin-denied").hidden = true;
      if (sub === "metrics") { loadMetrics(); } else { loadUsers(); }
    } else if (top === "health") { loadHealth(); }
  }

  // -- login / logout ----------------------------------------------------------------------

  function showLogin(message) {
    stopEvents();
    $("main-nav").hidden = true;
    $("who").hidden = true;
    showView("login");
    $("login-error").textContent = message || "";
    $("login-username").focus();
  }

  function enterApp(me) {
    state.me = me;
    $("main-nav").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = me.username + " (" + me.role + ")";
    startEvents();
    route();
  }

  function onLogin(event) {
    event.preventDefault();
    var username = $("login-username").value.trim();
    var password = $("login-password").value;
    ["login-username", "login-password"].forEach(function (id) { $(id).removeAttribute("aria-invalid"); });
    if (!username || !password) {
      $("login-error").textContent = "Enter your username and password.";
      if (!username) { $("login-username").setAttribute("aria-invalid", "true"); }
      if (!password) { $("login-password").setAttribute("aria-invalid", "true"); }
      return;
    }
    api("POST", "/api/auth/login", { username: username, password: password }).then(function (result) {
      if (!result.ok) {
        $("login-error").textContent = result.status === 401 ? "Invalid username or password." : detail(result);
        $("login-password").setAttribute("aria-invalid", "true");
        $("login-password").select();
        return;
      }
      $("login-password").value = "";
      $("login-error").textContent = "";
      return afterSignIn();
    });
  }

  function afterSignIn() {
    return api("GET", "/api/users/me").then(function (me) {
      if (me.ok) { enterApp(me.data); if (!location.hash || location.hash === "#") { location.hash = "#jobs"; } }
    });
  }

  function onKeyLogin(event) {
    event.preventDefault();
    var key = $("login-api-key").value.trim();
    $("login-api-key").removeAttribute("aria-invalid");
    if (!key) {
      $("key-login-error").textContent = "Enter an API key.";
      $("login-api-key").setAttribute("aria-invalid", "true");
      return;
    }
    api("POST", "/api/auth/login", { api_key: key }).then(function (result) {
      if (!result.ok) {
        $("key-login-error").textContent = result.status === 401 ? "Invalid or revoked API key." : detail(result);
        $("login-api-key").setAttribute("aria-invalid", "true");
        return;
      }
      $("login-api-key").value = "";
      $("key-login-error").textContent = "";
      return afterSignIn();
    });
  }

  // -- first sign-in (#setup=<token> from the link printed in the log) ---------------------

  function startSetup(token) {
    // Keep the token out of the address bar and history.
    if (window.history && window.history.replaceState) {
      window.history.replaceState(null, "", location.pathname + location.search);
    }
    state.setupToken = token;
    $("main-nav").hidden = true;
    $("who").hidden = true;
    showView("setup");
    api("POST", "/api/auth/setup/check", { token: token }).then(function (result) {
      if (result.ok && result.data && result.data.valid) {
        $("setup-intro").textContent = "Choose the password of the first administrator, " +
          result.data.username + ". This link works once.";
        $("setup-form").hidden = false;
        $("setup-password").focus();
      } else {
        $("setup-intro").textContent = "This setup link was used already or has expired. " +
          "Sign in with your password or the API key in admin.key.";
        showLogin();
        $("login-error").textContent = "The setup link was used already or has expired.";
      }
    });
  }

  function onSetup(event) {
    event.preventDefault();
    var password = $("setup-password").value;
    var repeat = $("setup-password-repeat").value;
    ["setup-password", "setup-password-repeat"].forEach(function (id) { $(id).removeAttribute("aria-invalid"); });
    if (password.length < 8) {
      $("setup-error").textContent = "The password needs at least 8 characters.";
      $("setup-password").setAttribute("aria-invalid", "true");
      return;
    }
    if (password !== repeat) {
      $("setup-error").textContent = "The two passwords differ.";
      $("setup-password-repeat").setAttribute("aria-invalid", "true");
      return;
    }
    api("POST", "/api/auth/setup", { token: state.setupToken, password: password }).then(function (result) {
      if (!result.ok) {
        $("setup-error").textContent = detail(result);
        return;
      }
      state.setupToken = null;
      $("setup-password").value = "";
      $("setup-password-repeat").value = "";
      flash("Password set. You are signed in.");
      return afterSignIn();
    });
  }

  function onLogout() {
    api("POST", "/api/auth/logout", {}).then(function () {
      state.me = null;
      showLogin("You are signed out.");
    });
  }

  // -- live events -------------------------------------------------------------------------------

  function startEvents() {
    stopEvents();
    if (!window.EventSource) { return; }
    var source = new EventSource("/api/events/stream");
    source.addEventListener("job", function () { scheduleJobsRefresh(); });
    source.onopen = function () { $("jobs-live").textContent = "Live updates on."; };
    source.onerror = function () { $("jobs-live").textContent = "Live updates reconnecting…"; };
    state.events = source;
  }

  function stopEvents() {
    if (state.events) { state.events.close(); state.events = null; }
  }

  function scheduleJobsRefresh() {
    if ($("view-jobs").hidden || state.refreshTimer) { return; }
    state.refreshTimer = setTimeout(function () { state.refreshTimer = null; loadJobs(); }, 400);
  }

  // -- jobs ---------------------------------------------------------------------------------------

  function progressText(progress) {
    if (!progress) { return ""; }
    var parts = [];
    if (progress.objects_completed) { parts.push(progress.objects_completed + " object(s)"); }
    parts.push(fmtBytes(progress.bytes_received || 0));
    if (progress.in_flight && progress.in_flight.length) {
      parts.push(progress.in_flight.length + " uploading");
    }
    return parts.join(", ");
  }

  function loadJobs() {
    var status = $("jobs-status").value;
    var path = "/api/cloud/jobs?limit=100" + (status ? "&status=" + encodeURIComponent(status) : "");
    api("GET", path).then(function (result) {
      var body = $("jobs-table").querySelector("tbody");
      clear(body);
      if (!result.ok) { flash(detail(result)); return; }
      var jobs = result.data.jobs || [];
      $("jobs-empty").hidden = jobs.length > 0;
      $("jobs-total").textContent = jobs.length ? "Showing " + jobs.length + " of " + result.data.total + " job(s)." : "";
      var active = [];
      jobs.forEach(function (job) {
        var row = document.createElement("tr");
        row.setAttribute("data-job-id", job.job_id);
        var idCell = cell(row, "");
        var code = document.createElement("code");
        code.textContent = String(job.job_id).slice(0, 12);
        code.title = job.job_id;
        idCell.appendChild(code);
        cell(row, job.status, "status status-" + job.status);
        cell(row, job.config_name || "");
        cell(row, job.hardware_profile || job.hardware_type || "");
        cell(row, typeof job.cost_usd === "number" ? job.cost_usd.toFixed(4) : "", "num");
        var progressCell = cell(row, progressText(job.upload_progress), "progress-cell");
        cell(row, fmtTime(job.created_at));
        var actions = cell(row, "");
        if (!TERMINAL[job.status] && role() >= ROLE_RANK.operator) {
          var cancel = document.createElement("button");
          cancel.type = "button";
          cancel.className = "danger";
          cancel.textContent = "Cancel";
          cancel.setAttribute("aria-label", "Cancel job " + job.job_id);
          cancel.addEventListener("click", function () { cancelJob(job.job_id); });
          actions.appendChild(cancel);
        }
        if (!TERMINAL[job.status]) { active.push([job.job_id, progressCell]); }
        body.appendChild(row);
      });
      state.activeJobs = active.slice(0, 10);
      refreshProgress();
    });
    loadApprovals();
  }

  // Upload progress changes without a status change: poll it for the active
  // jobs on screen (at most 10) while the Jobs view is open.
  function refreshProgress() {
    (state.activeJobs || []).forEach(function (item) {
      api("GET", "/api/cloud/jobs/" + encodeURIComponent(item[0])).then(function (detailResult) {
        if (detailResult.ok && detailResult.data) {
          var job = detailResult.data.job || {};
          item[1].textContent = progressText(detailResult.data.upload_progress || job.upload_progress);
        }
      });
    });
  }

  setInterval(function () {
    if (state.me && !$("view-jobs").hidden && !document.hidden) { refreshProgress(); }
  }, 5000);

  function cancelJob(jobId) {
    api("POST", "/api/cloud/jobs/" + encodeURIComponent(jobId) + "/cancel", {}).then(function (result) {
      flash(result.ok ? "Job " + jobId + " cancelled." : detail(result));
      loadJobs();
    });
  }

  function loadApprovals() {
    var panel = $("approvals-panel");
    if (role() < ROLE_RANK.operator) { panel.hidden = true; return; }
    api("GET", "/api/approvals?status=pending").then(function (result) {
      var body = $("approvals-table").querySelector("tbody");
      clear(body);
      var rows = result.ok ? (result.data.approvals || []) : [];
      panel.hidden = rows.length === 0;
      rows.forEach(function (item) {
        var row = document.createElement("tr");
        cell(row, String(item.job_id).slice(0, 12));
        cell(row, item.username || "");
        cell(row, item.reason || "");
        cell(row, typeof item.estimate_usd === "number" ? item.estimate_usd.toFixed(2) : "", "num");
        var actions = cell(row, "");
        [["approve", "Approve", ""], ["reject", "Reject", "danger"]].forEach(function (spec) {
          var button = document.createElement("button");
          button.type = "button";
          button.textContent = spec[1];
          button.className = spec[2];
          button.setAttribute("aria-label", spec[1] + " job " + item.job_id);
          button.addEventListener("click", function () {
            api("POST", "/api/approvals/" + item.id + "/" + spec[0], {}).then(function (r) {
              flash(r.ok ? spec[1] + "d job " + item.job_id + "." : detail(r));
              loadJobs();
            });
          });
          actions.appendChild(button);
        });
        body.appendChild(row);
      });
    });
  }

  // -- cloud: provider Advanced Configuration ------------------------------------------------------

  function loadProviders() {
    if (role() < ROLE_RANK.operator) {
      $("cloud-denied").hidden = false;
      $("provider-form").hidden = true;
      $("token-form").hidden = true;
      return;
    }
    $("cloud-denied").hidden = true;
    $("provider-form").hidden = false;
    $("token-form").hidden = false;
    api("GET", "/api/cloud/providers").then(function (result) {
      if (!result.ok) { flash(detail(result)); return; }
      var select = $("provider-select");
      var current = state.provider;
      clear(select);
      (result.data.providers || []).forEach(function (item) {
        var option = document.createElement("option");
        option.value = item.name;
        option.textContent = item.name;
        select.appendChild(option);
      });
      if (current) { select.value = current; }
      loadProvider(select.value);
    });
  }

  // The provider's API token: write-only, with where the current one comes from.
  function loadToken(name) {
    api("GET", "/api/cloud/providers/" + encodeURIComponent(name) + "/token").then(function (result) {
      if (!result.ok) { $("token-status").textContent = detail(result); return; }
      var data = result.data || {};
      $("token-status").textContent = data.configured ?
        "A token is configured (source: " + (data.source || "unknown") + ")." : "No token is configured.";
      $("token-delete").disabled = role() < ROLE_RANK.admin || data.source !== "file";
    });
    $("token-fieldset").disabled = role() < ROLE_RANK.admin;
  }

  function onTokenSave(event) {
    event.preventDefault();
    var token = $("provider_token").value.trim();
    if (!token) { setFieldError("provider_token", "Enter the API token."); return; }
    clearFieldError("provider_token");
    api("PUT", "/api/cloud/providers/" + encodeURIComponent(state.provider) + "/token", { token: token })
      .then(function (result) {
        if (!result.ok) {
          setFieldError("provider_token", detail(result));
          return;
        }
        $("provider_token").value = "";
        flash("Saved the API token." + (result.data && result.data.warning ? " " + result.data.warning : ""));
        loadToken(state.provider);
        $("provider-configured").textContent = result.data.configured ? "configured" : "not configured";
      });
  }

  function onTokenDelete() {
    api("DELETE", "/api/cloud/providers/" + encodeURIComponent(state.provider) + "/token").then(function (result) {
      flash(result.ok ? "Removed the API token from the secrets file." : detail(result));
      loadToken(state.provider);
      if (result.ok) { $("provider-configured").textContent = result.data.configured ? "configured" : "not configured"; }
    });
  }

  function loadProvider(name) {
    if (!name) { return; }
    state.provider = name;
    loadToken(name);
    api("GET", "/api/cloud/providers/" + encodeURIComponent(name)).then(function (result) {
      if (!result.ok) { flash(detail(result)); return; }
      fillProvider(result.data);
    });
  }

  function fillProvider(data) {
    var config = (data && data.config) || {};
    state.providerConfig = config;
    $("provider-configured").textContent = data.configured ? "configured" : "not configured";
    Object.keys(PROVIDER_FIELDS).forEach(function (field) {
      var input = $(field);
      var kind = PROVIDER_FIELDS[field].kind;
      var value = config[field];
      if (kind === "bool") { input.checked = !!value; }
      else if (kind === "lines") { input.value = (value || []).join("\n"); }
      else { input.value = value === null || value === undefined ? "" : String(value); }
      clearFieldError(field);
    });
    var readOnly = role() < ROLE_RANK.admin;
    var sets = $("provider-form").querySelectorAll("fieldset");
    for (var i = 0; i < sets.length; i++) { sets[i].disabled = readOnly; }
    $("provider-saved").textContent = readOnly ? "Read only: changing provider settings needs the admin role." : "";
  }

  function fieldValue(field) {
    var input = $(field);
    var kind = PROVIDER_FIELDS[field].kind;
    if (kind === "bool") { return input.checked; }
    if (kind === "lines") {
      return input.value.split(/\r?\n/).map(function (s) { return s.trim(); })
        .filter(function (s) { return s.length > 0; });
    }
    if (kind === "number") {
      var raw = input.value.trim();
      if (raw === "") { return null; }
      var number = Number(raw);
      return isNaN(number) ? raw : number;
    }
    return input.value.trim();
  }

  function saveProviderField(field) {
    var body = {};
    body[field] = fieldValue(field);
    var label = PROVIDER_FIELDS[field].label;
    $("provider-saved").textContent = "Saving " + label + "…";
    return api("PUT", "/api/cloud/providers/" + encodeURIComponent(state.provider), body).then(function (result) {
      if (result.ok) {
        clearFieldError(field);
        if (result.data && result.data.config) { state.providerConfig = result.data.config; }
        $("provider-saved").textContent = "Saved " + label + ".";
        return;
      }
      var data = result.data || {};
      if (result.status === 400) {
        setFieldError(data.field && $(data.field) ? data.field : field, data.detail || "Invalid value");
        $("provider-saved").textContent = label + " was not saved.";
      } else {
        $("provider-saved").textContent = label + " was not saved: " + detail(result);
      }
    });
  }

  function onProviderChange(event) {
    var field = event.target.id;
    if (!PROVIDER_FIELDS[field] || !state.provider) { return; }
    if (field === "ssl_verify" && !event.target.checked) {
      var accepted = false;
      try { accepted = window.sessionStorage.getItem(SSL_ACK_KEY) === "1"; } catch (e) { accepted = false; }
      if (!accepted) {
        if (!window.confirm(SSL_WARNING)) {
          event.target.checked = true;
          $("provider-saved").textContent = "SSL Verification left on.";
          return;
        }
        try { window.sessionStorage.setItem(SSL_ACK_KEY, "1"); } catch (e) { /* private mode */ }
      }
    }
    saveProviderField(field);
  }

  // -- admin: metrics ----------------------------------------------------------------------------

  function renderCategories(available, enabled) {
    var list = $("category-list");
    clear(list);
    available.forEach(function (name) {
      var label = document.createElement("label");
      var box = document.createElement("input");
      box.type = "checkbox";
      box.value = name;
      box.name = "prometheus_categories";
      box.id = "category-" + name;
      box.checked = enabled.indexOf(name) >= 0;
      label.appendChild(box);
      label.appendChild(document.createTextNode(name));
      list.appendChild(label);
    });
  }

  function metricsFromResponse(data) {
    var config = (data && data.config) || data || {};
    var categories = config.prometheus_categories || [];
    var available = config.available_categories || data.available_categories || METRIC_CATEGORIES;
    if (!Array.isArray(available)) { available = Object.keys(available); }
    return { enabled: !!config.prometheus_enabled, categories: categories, available: available };
  }

  function loadMetrics() {
    api("GET", "/api/cloud/metrics/config").then(function (result) {
      if (!result.ok) { $("metrics-saved").textContent = detail(result); return; }
      applyMetrics(metricsFromResponse(result.data));
    });
  }

  function applyMetrics(metrics) {
    state.metrics = metrics;
    $("prometheus_enabled").checked = metrics.enabled;
    renderCategories(metrics.available, metrics.categories);
    clearFieldError("prometheus_enabled");
    clearFieldError("prometheus_categories");
  }

  function selectedCategories() {
    var boxes = $("category-list").querySelectorAll("input[type=checkbox]");
    var out = [];
    for (var i = 0; i < boxes.length; i++) { if (boxes[i].checked) { out.push(boxes[i].value); } }
    return out;
  }

  function saveMetrics(field) {
    var body = { prometheus_enabled: $("prometheus_enabled").checked,
      prometheus_categories: selectedCategories() };
    $("metrics-saved").textContent = "Saving…";
    api("PUT", "/api/cloud/metrics/config", body).then(function (result) {
      if (result.ok) {
        $("metrics-saved").textContent = "Saved metrics settings.";
        applyMetrics(metricsFromResponse(result.data));
        return;
      }
      var data = result.data || {};
      setFieldError(data.field === "prometheus_enabled" ? "prometheus_enabled" :
        (data.field ? "prometheus_categories" : field), data.detail || detail(result));
      $("metrics-saved").textContent = "Metrics settings were not saved.";
    });
  }

  function applyTemplate(name) {
    api("POST", "/api/cloud/metrics/config/templates/" + encodeURIComponent(name), {}).then(function (result) {
      if (!result.ok) { $("metrics-saved").textContent = detail(result); return; }
      $("metrics-saved").textContent = "Applied the " + name + " template.";
      if (result.data && (result.data.prometheus_categories || (result.data.config &&
          result.data.config.prometheus_categories))) {
        applyMetrics(metricsFromResponse(result.data));
      } else {
        loadMetrics();
      }
    });
  }

  function previewMetrics() {
    var query = selectedCategories().map(function (c) { return "categories=" + encodeURIComponent(c); }).join("&");
    api("GET", "/api/cloud/metrics/config/preview" + (query ? "?" + query : "")).then(function (result) {
      var data = result.data;
      var text;
      if (!result.ok) { text = detail(result); }
      else if (typeof data === "string") { text = data; }
      else if (data && typeof data === "object") {
        text = data.content || data.preview || data.output || data.text || data.metrics ||
          JSON.stringify(data, null, 2);
        if (typeof text !== "string") { text = JSON.stringify(text, null, 2); }
      } else { text = ""; }
      $("metrics-preview").textContent = text;
    });
  }

  // -- admin: users -------------------------------------------------------------------------------

  function loadUsers() {
    api("GET", "/api/users?include_inactive=true").then(function (result) {
      var body = $("users-table").querySelector("tbody");
      clear(body);
      if (!result.ok) { flash(detail(result)); return; }
      (result.data.users || []).forEach(function (user) {
        var row = document.createElement("tr");
        cell(row, user.username);
        cell(row, user.email || "");
        cell(row, user.role);
        cell(row, user.disabled ? "yes" : "no");
        body.appendChild(row);
      });
    });
    api("GET", "/api/auth/settings").then(function (result) {
      if (result.ok) { $("registration_enabled").checked = !!result.data.registration_enabled; }
    });
  }

  function onRegistrationChange() {
    api("PUT", "/api/auth/settings", { registration_enabled: $("registration_enabled").checked }).then(function (r) {
      flash(r.ok ? "Saved registration setting." : detail(r));
    });
  }

  // -- health ---------------------------------------------------------------------------------------

  function loadHealth() {
    api("GET", "/api/cloud/health").then(function (result) {
      var data = result.data || {};
      $("health-status").textContent = data.status || "unknown";
      $("health-status").className = "status status-" + (data.status || "unknown");
      $("health-meta").textContent = data.version ? "version " + data.version + ", up " +
        Math.round(data.uptime_seconds || 0) + " s" : "";
      var body = $("health-table").querySelector("tbody");
      clear(body);
      (data.components || []).forEach(function (component) {
        var row = document.createElement("tr");
        cell(row, component.name);
        cell(row, component.status, "status status-" + component.status);
        cell(row, component.latency_ms === null || component.latency_ms === undefined ? "" :
          Number(component.latency_ms).toFixed(1), "num");
        cell(row, component.message || "");
        body.appendChild(row);
      });
    });
  }

  // -- start -----------------------------------------------------------------------------------------

  function init() {
    $("login-form").addEventListener("submit", onLogin);
    $("key-login-form").addEventListener("submit", onKeyLogin);
    $("setup-form").addEventListener("submit", onSetup);
    $("token-form").addEventListener("submit", onTokenSave);
    $("token-delete").addEventListener("click", onTokenDelete);
    $("logout").addEventListener("click", onLogout);
    $("jobs-refresh").addEventListener("click", loadJobs);
    $("jobs-status").addEventListener("change", loadJobs);
    $("health-refresh").addEventListener("click", loadHealth);
    $("provider-select").addEventListener("change", function (e) { loadProvider(e.target.value); });
    $("provider-form").addEventListener("change", onProviderChange);
    $("provider-form").addEventListener("submit", function (e) { e.preventDefault(); });
    $("metrics-form").addEventListener("submit", function (e) { e.preventDefault(); });
    $("prometheus_enabled").addEventListener("change", function () { saveMetrics("prometheus_enabled"); });
    $("category-list").addEventListener("change", function () { saveMetrics("prometheus_categories"); });
    $("metrics-preview-button").addEventListener("click", previewMetrics);
    var templates = document.querySelectorAll("[data-template]");
    for (var i = 0; i < templates.length; i++) {
      templates[i].addEventListener("click", function (e) { applyTemplate(e.target.getAttribute("data-template")); });
    }
    $("registration_enabled").addEventListener("change", onRegistrationChange);
    window.addEventListener("hashchange", function () { if (!state.setupToken) { route(); } });
    var setup = /^#setup=([A-Za-z0-9_-]+)$/.exec(location.hash || "");
    if (setup) { startSetup(setup[1]); return; }
    api("GET", "/api/users/me").then(function (result) {
      if (result.ok) { enterApp(result.data); } else { showLogin(); }
    });
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); }
  else { init(); }
}());
