/*
 * Uploads a file to the server (`POST /api/uploads`, one multipart part
 * named `file`), with XMLHttpRequest because fetch() reports no upload
 * progress. The only module that knows the upload route's answers.
 */
(function (ChatApp, _) {
  'use strict';

  var STATUS_TEXT = {
    400: 'The server could not read the upload.',
    401: 'Not allowed to upload: log in again.',
    403: 'Not allowed to upload.',
    413: 'The file is too large.',
    415: 'This type of file is not accepted.',
    429: 'Too much uploaded for now.'
  };

  function parse(text) {
    try {
      var value = JSON.parse(text);
      return _.isObject(value) ? value : null;
    } catch (e) {
      return null;
    }
  }

  /*
   * options: {url, token, file, progress(loaded, total), done(error, answer)}.
   * `done` is called once: error {status, code, message} (status 0 when the
   * request did not complete), or the server's answer {id, name, size, type,
   * width?, height?, thumb}. Not called after abort().
   */
  ChatApp.uploadFile = function (options) {
    var xhr = new window.XMLHttpRequest();
    var finished = false;
    var finish = function (error, answer) {
      if (!finished) {
        finished = true;
        options.done(error, answer);
      }
    };

    xhr.upload.addEventListener('progress', function (event) {
      if (event.lengthComputable) {
        options.progress(event.loaded, event.total);
      }
    });
    xhr.addEventListener('load', function () {
      var body = parse(xhr.responseText);
      if ((xhr.status === 201 || xhr.status === 200) && body && typeof body.id === 'string' && body.id) {
        finish(null, body);
        return;
      }
      var message = (body && typeof body.message === 'string' && body.message) ||
        STATUS_TEXT[xhr.status] || 'The upload failed (' + xhr.status + ').';
      var retryAfter = parseInt(xhr.getResponseHeader('Retry-After'), 10);
      if (xhr.status === 429 && retryAfter > 0) {
        message += ' Try again in ' + (retryAfter < 120 ? retryAfter + ' s' : Math.ceil(retryAfter / 60) + ' min') + '.';
      }
      finish({ status: xhr.status, code: (body && body.error) || 'http_' + xhr.status, message: message });
    });
    xhr.addEventListener('error', function () {
      finish({ status: 0, code: 'network', message: 'The upload failed: no connection to the server.' });
    });

    var form = new window.FormData();
    form.append('file', options.file, options.file.name);
    xhr.open('POST', options.url);
    xhr.setRequestHeader('Authorization', 'Bearer ' + options.token);
    xhr.setRequestHeader('Accept', 'application/json');
    xhr.send(form);

    return {
      abort: function () {
        finished = true; // the caller dropped it: no answer wanted
        xhr.abort();
      }
    };
  };
})(ChatApp, _);
