/*
 * Accounts (issue 13): the HTTP side of signing in, and the access token
 * this tab holds.
 *
 * ChatApp.auth.mode(cb)            cb('open' | 'accounts')
 * ChatApp.auth.register(name, password, cb)   cb(error, {name})
 * ChatApp.auth.signIn(name, password, cb)     cb(error, session)
 * ChatApp.auth.refresh(token, cb)             cb(error, {token, expiresIn})
 * ChatApp.auth.signOut(token, cb)             cb(error)
 * ChatApp.auth.store                          the tab's session: get/set/clear
 *
 * `error` is {status, code, message, retryAfter}; `message` is text for the
 * reader. A session is {token, name, expiresAt} (expiresAt: ms since the
 * epoch, by this browser's clock, taken from `expiresIn` when it arrived so
 * that a skewed clock between server and browser does not matter).
 */
(function (ChatApp, $, _) {
  'use strict';

  var REQUEST_TIMEOUT_MS = 10000;

  // Said for the server's error codes; anything else shows the server's message.
  var MESSAGES = {
    bad_credentials: 'Wrong name or password.',
    name_taken: 'That name is taken: choose another, or sign in.'
  };

  function failure(xhr, textStatus) {
    var body = xhr && xhr.responseJSON;
    var status = xhr ? xhr.status : 0;
    var code = body && typeof body.error === 'string' ? body.error : '';
    var message = MESSAGES[code] || (body && typeof body.message === 'string' && body.message) || '';
    var retryAfter = xhr ? parseInt(xhr.getResponseHeader('Retry-After') || '', 10) : NaN;
    if (status === 429) {
      code = code || 'rate_limited';
      message = 'Too many attempts: try again ' +
        (retryAfter > 0 ? 'in ' + retryAfter + ' second' + (retryAfter === 1 ? '' : 's') : 'later') + '.';
    } else if (!status) {
      code = 'offline';
      message = textStatus === 'timeout' ? 'No answer from the server.' : 'Cannot reach the server.';
    } else if (!message) {
      message = 'The server refused (' + status + ').';
    }
    return { status: status, code: code || 'http_' + status, message: message, retryAfter: retryAfter > 0 ? retryAfter : null };
  }

  // One JSON request; cb(error, body). `token`: sent as a Bearer token.
  function call(method, url, data, token, cb) {
    $.ajax({
      method: method,
      url: url,
      data: data === null ? undefined : JSON.stringify(data),
      contentType: data === null ? false : 'application/json',
      dataType: 'json',
      timeout: REQUEST_TIMEOUT_MS,
      headers: token ? { Authorization: 'Bearer ' + token } : {}
    }).done(function (body) {
      cb(null, body || {});
    }).fail(function (xhr, textStatus) {
      // A 204 has no JSON to parse: jQuery calls that a failure.
      if (xhr.status >= 200 && xhr.status < 300) {
        cb(null, {});
      } else {
        cb(failure(xhr, textStatus));
      }
    });
  }

  function session(name, body) {
    if (typeof body.token !== 'string' || !body.token) {
      return null;
    }
    var ttl = typeof body.expiresIn === 'number' && body.expiresIn > 0 ? body.expiresIn : 60;
    return {
      token: body.token,
      name: typeof body.name === 'string' && body.name ? body.name : name,
      expiresAt: Date.now() + ttl * 1000
    };
  }

  var BAD_ANSWER = { status: 200, code: 'bad_answer', message: 'The server sent no token.', retryAfter: null };

  // sessionStorage: this tab only (a second tab signs in on its own), and
  // gone when the tab closes. Not localStorage: a token lying around after
  // the tab is closed is one more thing to steal.
  var STORE_KEY = 'chat.session';
  var store = {
    get: function () {
      var raw;
      try { raw = window.sessionStorage.getItem(STORE_KEY); } catch (e) { return null; }
      var saved = null;
      try { saved = raw ? JSON.parse(raw) : null; } catch (e) { saved = null; }
      if (!_.isObject(saved) || typeof saved.token !== 'string' || typeof saved.name !== 'string' ||
          typeof saved.expiresAt !== 'number' || saved.expiresAt <= Date.now()) {
        return null; // an expired token cannot connect: sign in again
      }
      return saved;
    },
    set: function (value) {
      try { window.sessionStorage.setItem(STORE_KEY, JSON.stringify(value)); } catch (e) { /* storage disabled */ }
    },
    clear: function () {
      try { window.sessionStorage.removeItem(STORE_KEY); } catch (e) { /* storage disabled */ }
    }
  };

  ChatApp.auth = {
    store: store,

    // Which login the server wants. A server without accounts (older, or an
    // answer that is not the expected JSON) is an open one.
    mode: function (cb) {
      call('GET', '/api/auth/mode', null, null, function (error, body) {
        cb(!error && body.mode === 'accounts' ? 'accounts' : 'open');
      });
    },

    register: function (name, password, cb) {
      call('POST', '/api/accounts', { name: name, password: password }, null, cb);
    },

    signIn: function (name, password, cb) {
      call('POST', '/api/sessions', { name: name, password: password }, null, function (error, body) {
        var got = error ? null : session(name, body);
        cb(error || (got ? null : BAD_ANSWER), got);
      });
    },

    // A new access token for a still-valid one (the name stays).
    refresh: function (current, cb) {
      call('POST', '/api/sessions/refresh', null, current.token, function (error, body) {
        var got = error ? null : session(current.name, body);
        cb(error || (got ? null : BAD_ANSWER), got && _.extend(got, { name: current.name }));
      });
    },

    signOut: function (token, cb) {
      call('DELETE', '/api/sessions', null, token, cb);
    }
  };
})(ChatApp, jQuery, _);
