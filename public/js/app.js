/*
 * The ChatApp namespace and the template helper shared by every view.
 *
 * Templates live in index.html as <script type="text/template"> blocks and
 * may only insert values with <%- %>, which HTML-escapes them. <%= %> (raw
 * HTML, the seed's XSS) is switched off here: a template that still uses it
 * fails to compile instead of inserting markup.
 */
(function (window, _) {
  'use strict';

  _.templateSettings = {
    evaluate: /<%([\s\S]+?)%>/g,
    escape: /<%-([\s\S]+?)%>/g,
    // Never matches (the group keeps underscore's argument order): <%= x %> is
    // then read as code, "= x", and the template fails to compile.
    interpolate: /(?!)([\s\S])/g
  };

  var cache = {};

  var ChatApp = {
    models: {},
    views: {},

    // The compiled template of <script type="text/template" id="ID">.
    template: function (id) {
      if (!cache[id]) {
        var source = window.document.getElementById(id);
        if (!source) {
          throw new Error('missing template #' + id);
        }
        cache[id] = _.template(source.innerHTML);
      }
      return cache[id];
    },

    // "14:05" in the reader's time zone, and the full date for a tooltip.
    formatTime: function (iso) {
      if (!iso) {
        return { clock: '', fullTime: '' };
      }
      var date = new Date(iso);
      if (isNaN(date.getTime())) {
        return { clock: '', fullTime: '' };
      }
      return {
        clock: date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }),
        fullTime: date.toLocaleString()
      };
    }
  };

  window.ChatApp = ChatApp;
})(window, _);
