// The runs page, live: each change of a run comes from /live (Server-Sent Events) with the run's
// summary and its row, rendered and escaped by the server; a row the page's filter admits
// replaces the old one or goes on top. Nothing here builds HTML from message text.
(function () {
  const table = document.getElementById("runs");
  if (!table || !window.EventSource) return;
  const body = table.tBodies[0];
  const pipeline = table.dataset.pipeline;
  const state = table.dataset.state;
  const template = document.createElement("template");
  const source = new EventSource("/live");
  source.addEventListener("run", function (message) {
    const change = JSON.parse(message.data);
    const run = change.run;
    if ((pipeline && run.pipeline !== pipeline) || (state && run.state !== state)) return;
    template.innerHTML = change.row;
    const row = template.content.firstElementChild;
    const old = document.getElementById("run-" + run.run_id);
    if (old) {
      old.replaceWith(row);
    } else {
      body.insertBefore(row, body.firstChild);
    }
  });
})();

// The run page's actions (present only when the page may act): cancel the run, replay a parked
// message. The token goes as a header, never in the URL; the server's answer is shown as text.
(function () {
  const token = document.getElementById("token");
  if (!token) return;
  function act(button, url) {
    const output = button.parentElement.querySelector("output");
    fetch(url, {
      method: "POST",
      headers: { Authorization: "Bearer " + token.value },
    }).then(function (answer) {
      return answer.text().then(function (text) {
        output.textContent = answer.status + " " + text;
      });
    }).catch(function (error) {
      output.textContent = "not sent: " + error;
    });
  }
  const cancel = document.getElementById("cancel");
  if (cancel) {
    cancel.addEventListener("click", function () {
      act(cancel, "/runs/" + cancel.dataset.run + "/cancel");
    });
  }
  document.querySelectorAll("button.replay").forEach(function (button) {
    button.addEventListener("click", function () {
      act(button, "/parked/" + encodeURIComponent(button.dataset.id) + "/replay");
    });
  });
})();
